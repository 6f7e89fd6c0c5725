"""``FileStorage`` keeps its promises about secrets (issue 21, finding 10).

* ``encryption_key`` seals secret values on disk, as the PostgreSQL backend does in its table
  (the same ``sealing`` format): before this, the file backend accepted the key and stored
  private keys in clear.
* ``root_problems`` names a storage root others could swap or write into (a symbolic link, a
  world-writable or foreign folder, a parent others may rename it in); ``check`` reports it.
  The refusal at start is tested through the command line in
  ``tests/integration/test_cli_config_safety.py``.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from edgeproxy.certs.inventory import check_storage, clean_storage
from edgeproxy.certs.record import cert_key
from edgeproxy.errors import CorruptRecord
from edgeproxy.storage import FileStorage
from edgeproxy.storage.file import root_problems
from edgeproxy.storage.sealing import generate_encryption_key
from testkit.certrecords import cert_record

SECRET = b'{"key_pem": "-----BEGIN EC PRIVATE KEY-----\\nMHcCAQEEI..."}'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# -- encryption at rest ------------------------------------------------------------------------


async def test_secret_values_are_sealed_on_disk_and_read_back_plain(root: Path) -> None:
    storage = FileStorage(root, encryption_key=generate_encryption_key())
    await storage.put("certs/a.example.json", SECRET, secret=True)
    on_disk = storage.path_of("certs/a.example.json").read_bytes()
    assert on_disk.startswith(b"\x00edgeproxy-sealed\x00\x01")
    assert b"PRIVATE KEY" not in on_disk and b"MHcCAQEEI" not in on_disk
    assert await storage.get("certs/a.example.json") == SECRET
    assert await storage.check() == []


async def test_public_values_stay_clear_with_a_key(root: Path) -> None:
    storage = FileStorage(root, encryption_key=generate_encryption_key())
    await storage.put("status/a.example.json", b'{"state": "valid"}')
    assert storage.path_of("status/a.example.json").read_bytes() == b'{"state": "valid"}'


async def test_clear_values_that_look_like_the_sealed_format_stay_clear(root: Path) -> None:
    # Values are bytes: one starting 0x01 (the sealed format's version byte) is still data.
    value = b"\x01" * 64
    for storage in (FileStorage(root), FileStorage(root, encryption_key=generate_encryption_key())):
        await storage.put("busy/key", value)
        assert await storage.get("busy/key") == value


async def test_sealed_value_without_the_key_or_with_another_is_corrupt(root: Path) -> None:
    key = generate_encryption_key()
    await FileStorage(root, encryption_key=key).put("certs/a.example.json", SECRET, secret=True)
    with pytest.raises(CorruptRecord, match="no encryption key is configured"):
        await FileStorage(root).get("certs/a.example.json")
    with pytest.raises(CorruptRecord, match="encrypted with another key"):
        await FileStorage(root, encryption_key=generate_encryption_key()).get(
            "certs/a.example.json"
        )
    assert "no encryption key is configured" in " ".join(await FileStorage(root).check())
    other = FileStorage(root, encryption_key=generate_encryption_key())
    assert "encrypted with another key" in " ".join(await other.check())


async def test_a_sealed_file_moved_under_another_key_fails_to_open(root: Path) -> None:
    storage = FileStorage(root, encryption_key=generate_encryption_key())
    await storage.put("certs/a.example.json", SECRET, secret=True)
    await storage.put("certs/b.example.json", b"{}", secret=True)
    # The storage key is in the associated data: a.example's record cannot pose as b.example's.
    storage.path_of("certs/a.example.json").replace(storage.path_of("certs/b.example.json"))
    with pytest.raises(CorruptRecord, match="failed to decrypt"):
        await storage.get("certs/b.example.json")


async def test_clear_secrets_from_before_the_key_stay_readable_and_are_reported(
    root: Path,
) -> None:
    await FileStorage(root).put("certs/a.example.json", SECRET, secret=True)
    storage = FileStorage(root, encryption_key=generate_encryption_key())
    assert await storage.get("certs/a.example.json") == SECRET
    assert await storage.check() == [
        "secret value 'certs/a.example.json' is stored unencrypted (store it again to encrypt it)"
    ]
    await storage.put("certs/a.example.json", SECRET, secret=True)
    assert await storage.check() == []


# -- the root must be ours alone ---------------------------------------------------------------


async def test_a_private_root_has_no_problems(root: Path) -> None:
    storage = FileStorage(root)
    assert root_problems(root) == []  # not created yet: judged by its parents
    await storage.put("k", b"v")
    assert storage.root_problems() == []
    assert await storage.check() == []


async def test_a_symlinked_root_is_reported(tmp_path: Path) -> None:
    real = tmp_path / "real"
    await FileStorage(real).put("k", b"v")
    link = tmp_path / "link"
    link.symlink_to(real)
    problems = FileStorage(link).root_problems()
    assert len(problems) == 1 and "is a symbolic link" in problems[0] and str(real) in problems[0]
    assert problems == await FileStorage(link).check()


async def test_a_world_writable_root_is_reported(root: Path) -> None:
    storage = FileStorage(root)
    await storage.put("k", b"v")
    os.chmod(root, 0o777)
    assert storage.root_problems() == [
        f"storage root {root} is writable by everyone (mode 0777): anyone can plant or swap "
        f"entries in it (chmod 700 {root})"
    ]
    assert storage.root_problems()[0] in await storage.check()


@pytest.mark.parametrize(("mode", "unsafe"), [(0o777, True), (0o1777, False), (0o755, False)])
def test_a_parent_others_may_rename_the_root_in_is_reported(
    tmp_path: Path, mode: int, unsafe: bool
) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, mode)  # 1777: sticky, like /tmp: others cannot rename what is ours
    root = parent / "store"
    root.mkdir(mode=0o700)
    problems = root_problems(root)
    assert bool(problems) is unsafe, problems
    if unsafe:
        assert f"parent folder {parent} (mode 0777" in problems[0]
    # Not created yet: judged by the same parents.
    assert bool(root_problems(parent / "later" / "store")) is unsafe


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user owns needs root")
def test_a_root_or_parent_owned_by_another_user_is_reported(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    root = parent / "store"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    assert any("belongs to uid 65534" in p for p in root_problems(root))
    os.chown(root, 0, 0)
    os.chown(parent, 65534, 65534)
    assert any(f"parent folder {parent}" in p for p in root_problems(root))


async def test_storage_check_and_clean_leave_records_they_cannot_open(root: Path) -> None:
    # A wrong or missing key is an operator's slip, not corruption: report, never delete.
    key = generate_encryption_key()
    expired = cert_record("old.example", dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    await FileStorage(root, encryption_key=key).put(
        cert_key("old.example"), expired.to_json(), secret=True
    )
    keyless = FileStorage(root)
    problems = await check_storage(keyless)
    assert problems == [
        "value 'certs/old.example.json' is encrypted at rest but no encryption key is "
        "configured (set storage.encryption_key_env)"
    ]
    assert await clean_storage(keyless, 0.0) == []
    assert keyless.path_of(cert_key("old.example")).is_file()
    # With the key, the same record is simply expired, and goes.
    removed = await clean_storage(FileStorage(root, encryption_key=key), 0.0)
    assert removed == ["certs/old.example.json (expired 2020-01-01)"]
