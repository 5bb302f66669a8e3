"""Running a CLI's main() in-process the way a shell would see it."""


def run_cli(main, argv, capsys):
    """(exit code, stderr) of main(argv), argparse's SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err
