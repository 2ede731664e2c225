"""Custom ops (`torch.ops.llama_aot.*`), each with a plain-torch reference; importing
`llama_aot.kernels.ops` registers them.

This folder is also importable as a top-level `kernels` whenever the directory holding this
checkout is on sys.path (`python -m ...` or `python -m pytest` from the repository root), where it
would hide the `kernels` distribution that transformers imports (transformers >= 5.25 depends on
it). Imported under that name, this module steps aside: it loads the installed distribution in its
place. Without one (transformers < 5.25, as on the GPU machine's image) it stays an empty module
with no `__file__`, which is how transformers' availability probe, after `find_spec` has found
this folder, recognises a directory shadowing a package that is not installed; raising instead
would fail `import transformers` itself. tests/test_packaging.py checks both from the root.
"""
import sys as _sys

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        del __file__
    else:
        _installed = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _installed  # the import system returns what sys.modules holds
        _spec.loader.exec_module(_installed)
