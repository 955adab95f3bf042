"""The serving-overhead benchmark (see smlaas.bench.serving; also `smlaas bench serving`)."""

from smlaas.bench.serving import main

if __name__ == "__main__":
    main()
