"""No secret from a URL reaches any output (RELIABILITY.md R22): user-info is removed at the one
boundary where text leaves the process, whatever printed it."""

import subprocess
import sys

from tape_pretrain.cli import main
from tape_pretrain.utils.redact import redact_text

SECRET = "CANARYpw7x"


def test_user_info_is_removed_from_every_scheme():
    for url in (f"http://alice:{SECRET}@host/x", f"s3://bob:{SECRET}@bkt/x", f"gs://k:{SECRET}@b/c",
                f"s3://AKIA:wJalr/{SECRET}/K7@bkt/x"):  # AWS secret keys hold '/'

        assert SECRET not in redact_text(f"error: {url}: failed") and "***@" in redact_text(url)


def test_error_lines_are_redacted(capsys):
    code = main(["data", "inspect", f"http://alice:{SECRET}@127.0.0.1:1/ds"])
    captured = capsys.readouterr()
    assert code == 2 and "http://***@127.0.0.1:1/ds" in captured.err
    assert SECRET not in captured.err + captured.out


def test_an_unexpected_traceback_is_redacted(cli_env, tmp_path):
    """Even text Python itself prints at exit goes through the redacting streams."""
    script = ("import sys; from tape_pretrain import cli; "
              "cli.build_parser = lambda: (_ for _ in ()).throw(RuntimeError('boom at s3://bob:" + SECRET + "@b/x')); "
              "sys.argv = ['tape-pretrain', 'data', 'inspect', 'x']; sys.exit(cli.main())")
    out = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "boom at" in out.stderr
    assert SECRET not in out.stderr + out.stdout


def test_user_info_quoted_by_a_library_out_of_url_form_is_redacted(capsys, tmp_path, s3_env):
    """s3fs/botocore report 'Invalid bucket name "bob:PW@bkt"': no scheme left for the URL pattern to match."""
    code = main(["data", "inspect", f"s3://bob:{SECRET}@{s3_env}/ds"])
    captured = capsys.readouterr()
    assert code == 2 and "error:" in captured.err
    assert SECRET not in captured.err + captured.out, captured.err
