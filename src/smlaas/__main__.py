from smlaas.cli.main import run

run()
