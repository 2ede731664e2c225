"""llama-compile: checkpoint -> model -> torch.export -> passes -> AOTInductor -> verified artifact."""
