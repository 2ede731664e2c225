"""Fixes for AOTInductor bugs of the torch versions we build with, applied only while lowering.

`codegen_int_array_var` (the C++ wrapper's size/stride array declarations) caches each
declaration by the id of the `writeline` it was written through. In torch 2.11 that id is the id
of a bound method, a temporary whose id the next temporary reuses, so writers into different
scopes share cache entries: a declaration written inside a nested block is handed to a use
outside it. On the H200, the 8B build for 2048-token steps failed to compile with "'int_array_15'
was not declared in this scope". Later torch keys the cache by the object the method is bound
to; on a torch that does not, `lowering_fixes` installs that keying for the duration of a build,
so other compiles in the process see torch unchanged.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def int_array_var_keyed_by_writer(self, int_array: str, writeline: Callable[..., None], known_statically=False,
                                  graph=None) -> str:
    """`codegen_int_array_var`, caching per writer object (the buffer) rather than per bound method."""
    writer = getattr(writeline, "__self__", writeline)
    key = (int_array, id(writer), known_statically, id(graph) if graph else None)
    cache = self.codegen_int_array_var_cache
    if key not in cache:
        cache[key] = self._codegen_int_array_var_impl(int_array, writeline, known_statically)
    return cache[key]


def _keys_by_bound_method(wrapper_class) -> bool:
    try:
        source = inspect.getsource(wrapper_class.codegen_int_array_var)
    except (OSError, TypeError):  # no source to read: leave torch as it is
        return False
    return "id(writeline)," in source and "__self__" not in source


@contextmanager
def lowering_fixes(wrapper_class=None) -> Iterator[None]:
    """`wrapper_class` is Inductor's C++ wrapper (CppWrapperCpu, which the CUDA wrapper extends)."""
    if wrapper_class is None:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu as wrapper_class
    if not _keys_by_bound_method(wrapper_class):
        yield
        return
    original = wrapper_class.codegen_int_array_var
    wrapper_class.codegen_int_array_var = int_array_var_keyed_by_writer
    try:
        yield
    finally:
        wrapper_class.codegen_int_array_var = original
