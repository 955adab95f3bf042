"""Benchmarks behind `smlaas bench`: results as JSON, tables for docs/BENCHMARKS.md."""
