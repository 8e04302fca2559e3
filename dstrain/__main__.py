"""`python -m dstrain export ...`: the same as the `dstrain` command."""

from dstrain.commands import main

if __name__ == "__main__":
    main()
