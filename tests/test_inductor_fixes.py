"""The AOTInductor fix applied while lowering: int-array declarations are cached per writer, so
a declaration written into one scope is never handed to another, even when the bound methods
used to write them share an id (they are temporaries, and CPython reuses the freed address)."""
from llama_aot.compiler import inductor_fixes
from llama_aot.compiler.inductor_fixes import int_array_var_keyed_by_writer, lowering_fixes


class Buffer:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


class Wrapper:
    """The part of torch 2.11's CppWrapperCpu the cache touches, with its bound-method keying."""

    def __init__(self):
        self.codegen_int_array_var_cache = {}
        self.declared = 0

    def _codegen_int_array_var_impl(self, int_array, writeline, known_statically):
        self.declared += 1
        var = f"int_array_{self.declared}"
        writeline(f"const int64_t {var}[] = {int_array};")
        return var

    def codegen_int_array_var(self, int_array, writeline, known_statically=False, graph=None):
        cache_key = (int_array, id(writeline), known_statically, id(graph) if graph else None)
        if cache_key not in self.codegen_int_array_var_cache:
            self.codegen_int_array_var_cache[cache_key] = self._codegen_int_array_var_impl(
                int_array, writeline, known_statically)
        return self.codegen_int_array_var_cache[cache_key]


def test_declarations_stay_in_the_scope_they_were_written_to():
    inner, outer = Buffer(), Buffer()
    with lowering_fixes(Wrapper):
        wrapper = Wrapper()
        first = wrapper.codegen_int_array_var("{2048L, 32L, 128L}", inner.writeline)
        second = wrapper.codegen_int_array_var("{2048L, 32L, 128L}", outer.writeline)
        again = wrapper.codegen_int_array_var("{2048L, 32L, 128L}", outer.writeline)
    assert first != second and second == again
    assert any(second in line for line in outer.lines) and not any(second in line for line in inner.lines)
    assert Wrapper.codegen_int_array_var is not int_array_var_keyed_by_writer  # restored after the build


def test_a_torch_that_keys_by_writer_is_left_alone():
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    before = CppWrapperCpu.codegen_int_array_var
    with lowering_fixes():
        patched = CppWrapperCpu.codegen_int_array_var is not before
    assert patched == inductor_fixes._keys_by_bound_method(CppWrapperCpu)
    assert CppWrapperCpu.codegen_int_array_var is before
