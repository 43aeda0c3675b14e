"""The op families: functional API, autograd, torch.library registration, dispatch."""
