"""The coordinator: attests workers, issues role certificates, releases stage keys."""
