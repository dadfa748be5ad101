"""``python -m binarize`` (and ``accelerate launch -m binarize`` / ``torchrun -m binarize``) runs the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
