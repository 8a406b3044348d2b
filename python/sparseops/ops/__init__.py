"""One module per op family: declaration, fake implementation, autograd, backend choice."""
