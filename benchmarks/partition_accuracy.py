"""The prediction-accuracy benchmark (see smlaas.bench.accuracy; also `smlaas bench accuracy`)."""

from smlaas.bench.accuracy import main

if __name__ == "__main__":
    main()
