"""`threadline up`'s secrets.json: generated once, completed when an older version wrote it, 0600."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from shared.encryption import Keyring
from shared.natsauth import USERS
from threadline.cli import load_secrets, service_env


def test_an_older_secrets_file_gets_the_key_and_nats_passwords_and_keeps_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    old = {"accountKeyId": "act_" + "1" * 24, "accountKeySecret": "kept-account-secret-0123456789",
           "sdkTokenSecret": "kept-sdk-secret-0123456789"}
    path = data / "secrets.json"
    path.write_text(json.dumps(old))
    os.chmod(path, 0o644)
    keys = load_secrets(str(data))
    assert {k: keys[k] for k in old} == old
    assert Keyring.parse(keys["secretsKey"]).primary_id == "k1"
    assert set(keys["natsPasswords"]) == set(USERS) and len(set(keys["natsPasswords"].values())) == len(USERS)
    assert json.loads(path.read_text()) == keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(data.stat().st_mode) == 0o700
    assert load_secrets(str(data)) == keys  # generated once


def test_each_service_gets_its_own_nats_user_and_the_key_only_if_it_uses_secrets(tmp_path: Path) -> None:
    keys = load_secrets(str(tmp_path))
    base = {"THREADLINE_SECRETS_KEY": "from-the-shell", "PATH": "/bin"}
    conversations = service_env(base, "conversations", keys, 8081)
    assert conversations["THREADLINE_NATS_USER"] == "conversations"
    assert conversations["THREADLINE_NATS_PASSWORD"] == keys["natsPasswords"]["conversations"]
    assert conversations["THREADLINE_SECRETS_KEY"] == keys["secretsKey"] and conversations["PATH"] == "/bin"
    web = service_env(base, "web", keys, 8083)
    assert web["THREADLINE_NATS_USER"] == "web" and "THREADLINE_SECRETS_KEY" not in web
