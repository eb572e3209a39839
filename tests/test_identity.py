"""The key file: created once with mode 0600, reused, never silently replaced."""

import stat

import pytest

from punchgate.identity import IdentityError, load_or_create_identity


def test_created_with_mode_0600_and_reused(tmp_path):
    path = tmp_path / "sub" / "id.key"
    first, created = load_or_create_identity(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second, created_again = load_or_create_identity(path)
    assert not created_again
    assert second.public_key.to_bytes() == first.public_key.to_bytes()
    assert second.private_key.to_bytes() == first.private_key.to_bytes()


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x01\x12\x20" + b"\x00" * 5])
def test_corrupt_file_is_an_error_and_left_alone(tmp_path, content):
    path = tmp_path / "id.key"
    path.write_bytes(content)
    path.chmod(0o600)  # private, so that the content is what is judged
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content


def test_unreadable_file_is_an_error(tmp_path):
    path = tmp_path / "id.key"
    path.mkdir()  # a directory where the key should be: reading fails
    with pytest.raises(IdentityError):
        load_or_create_identity(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o700 | 0o044])
def test_file_others_can_read_is_refused_with_the_chmod_that_fixes_it(tmp_path, mode):
    path = tmp_path / "id.key"
    load_or_create_identity(path)
    path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(path)
    message = str(info.value)
    assert message.endswith(f"chmod 600 {path}") and f"mode {mode:04o}" in message and "\n" not in message
    path.chmod(0o600)
    assert not load_or_create_identity(path)[1]  # fixed: used as it is
    path.chmod(0o400)  # read-only for its owner is fine too
    assert not load_or_create_identity(path)[1]
