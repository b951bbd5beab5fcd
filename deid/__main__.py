"""`python -m deid ...`: the same as the `deid` console script."""

from deid.launcher import main

if __name__ == "__main__":
    main()
