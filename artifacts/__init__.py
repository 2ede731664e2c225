"""The artifact contract: everything the compiler and the runtime must agree on, importing neither.

Configs (config.py), the manifest (manifest.py), file digests (digest.py), the weights file
(weights_file.py), the KV-cache layout (kv_layout.py), the step ABI (step_abi.py), the target
check (target.py) and program loading (program.py). Builds land in artifacts/NAME/ (gitignored).
"""
