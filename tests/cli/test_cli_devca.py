"""`maiactl dev-ca`: a directory it cannot write and a node id or client name that cannot name a
file are usage errors (exit 2, one line, no traceback), refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller import devca
from controller.cli.main import main


def test_a_directory_that_cannot_be_made_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "pki"
    assert main(["dev-ca", "--dir", str(where)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: dev-ca: {where}: Not a directory\n"


@pytest.mark.parametrize("flag, name, says", [
    ("--node", "bad/../id", "cannot name a file in the CA's directory ('node-bad/../id' has a '/' or a NUL)"),
    ("--client", "../../me", "cannot name a file in the CA's directory ('client-../../me' has a '/' or a NUL)"),
    ("--node", "", "must not be empty"),
    ("--node", "n" * 65, "is 65 characters long; a certificate's common name holds at most 64"),
])
def test_a_name_that_cannot_be_a_certificates_is_refused_before_anything_is_written(
        tmp_path: Path, capsys, flag: str, name: str, says: str) -> None:
    """It would have written the key outside --dir, or failed with a traceback (or after the CA)."""
    assert main(["dev-ca", "--dir", str(tmp_path / "pki"), "--node", "n1", flag, name]) == 2
    assert capsys.readouterr().err == f"error: dev-ca: {flag} {name!r}: {says}\n"
    assert not (tmp_path / "pki").exists()


def test_the_library_refuses_such_a_name_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has a '/'"):
        devca.issue_node(tmp_path, "x/../../y")
    assert list(tmp_path.iterdir()) == []
    assert devca.issue_node(tmp_path, "rack-00-n01").cert == tmp_path / "node-rack-00-n01.pem"


def test_half_a_ca_is_refused_and_its_key_kept(tmp_path: Path, capsys) -> None:
    """With ca.pem moved away, a new CA was made and ca-key.pem silently overwritten."""
    pki = tmp_path / "pki"
    assert main(["dev-ca", "--dir", str(pki)]) == 0
    key = (pki / devca.CA_KEY).read_bytes()
    (pki / devca.CA_CERT).rename(tmp_path / "ca.pem")
    capsys.readouterr()
    assert main(["dev-ca", "--dir", str(pki), "--node", "n1"]) == 2
    err = capsys.readouterr().err
    assert f"{pki / devca.CA_KEY} is there but {pki / devca.CA_CERT} is not" in err
    assert (pki / devca.CA_KEY).read_bytes() == key and not (pki / "node-n1.pem").exists()
    (tmp_path / "ca.pem").rename(pki / devca.CA_CERT)  # put back: the same CA again
    assert main(["dev-ca", "--dir", str(pki), "--node", "n1"]) == 0
    assert (pki / devca.CA_KEY).read_bytes() == key

