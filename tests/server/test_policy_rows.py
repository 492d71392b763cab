"""Stored release policies carry a MAC under the KEK: someone who can write the database but has no
KEK cannot make the server apply a policy of theirs (a permissive one would release keys to any
genuine guest, their own rented one included)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text, update

from keybroker.errors import ConfigError, StoreError
from keybroker.server import schema
from keybroker.server.admin import Admin
from keybroker.server.policy import Policy
from keybroker.server.sealing import Kek, Sealer
from keybroker.server.store import Store
from support.policies import ANY_GUEST

KEK = Kek.from_bytes(bytes(range(32)), "test")
NEXT_KEK = Kek.from_bytes(bytes(range(1, 33)), "test")
PINNED = Policy({"version": 1, "rules": [{"resources": ["*"], "require": {"claim": "snp.measurement",
                                                                          "equals": "ab" * 48}}]})


SEALER = Sealer(KEK)


def admin(url: str, sealer: Sealer | None = SEALER) -> Admin:
    return Admin(Store(url, sealer), sealer, "local:test", "test")


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/kbs.db"
    assert admin(url).put_policy(PINNED.dumps()) == (1, True)
    return url


# A MAC of the writer's own making; hmac.compare_digest raises TypeError for text that is not ASCII
# (or for no text: SQLite keeps what it is given), which made every release a 500 with a traceback.
@pytest.mark.parametrize("forge", ["insert", "insert_not_ascii", "insert_not_text", "edit", "edit_and_digest",
                                   "edit_not_text", "edit_created"])
def test_a_policy_row_written_without_the_kek_is_not_applied(url, forge):
    store = Store(url, Sealer(KEK))
    mac = {"insert": "A" * 43, "insert_not_ascii": "\u00e9" * 43, "insert_not_text": b"A" * 43}.get(forge)
    edits = {"edit": {"document": ANY_GUEST.dumps()},
             "edit_and_digest": {"document": ANY_GUEST.dumps(), "digest": ANY_GUEST.digest},
             "edit_not_text": {"actor": b"local:root"}, "edit_created": {"created": float("inf")}}
    with store.engine.begin() as db:
        if mac is not None:  # a newer version
            db.execute(schema.policies.insert().values(version=2, digest=ANY_GUEST.digest, document=ANY_GUEST.dumps(),
                                                       created=0.0, actor="local:root", mac=mac))
        else:
            db.execute(update(schema.policies).where(schema.policies.c.version == 1).values(**edits[forge]))
    with pytest.raises(StoreError, match="fails its MAC"):
        Store(url, Sealer(KEK)).active_policy()
    with pytest.raises(StoreError, match="fails its MAC"):
        Store(url, Sealer(Kek.from_bytes(bytes(32), "another"))).get_policy(1)  # another KEK believes none
    # Put again, the operator's policy is a new version, believed.
    version, changed = admin(url).put_policy(PINNED.dumps())
    assert changed and Store(url, Sealer(KEK)).active_policy().version == version


def test_a_policy_is_stored_only_with_the_kek(url):
    with pytest.raises(ConfigError, match="needs the key-encryption key"):
        admin(url, None).put_policy(ANY_GUEST.dumps())
    assert Store(url).active_policy().digest == PINNED.digest  # shown, unchecked, without it


def test_policies_stay_believed_across_a_kek_rotation(url):
    rotating = Sealer(NEXT_KEK, [KEK])
    assert Store(url, rotating).active_policy().digest == PINNED.digest  # the old KEK's MAC, during it
    admin(url, rotating).rotate_kek()
    assert Store(url, Sealer(NEXT_KEK)).active_policy().digest == PINNED.digest  # the old KEK dropped


def test_a_kek_rotation_does_not_make_a_policy_row_written_without_the_kek_believed(url):
    """rotate-kek MACs again the rows an old KEK's MAC holds for, not every row not under the new KEK:
    a permissive policy someone without the KEK put in the database would be applied after it."""
    with Store(url).engine.begin() as db:
        db.execute(schema.policies.insert().values(version=2, digest=ANY_GUEST.digest, document=ANY_GUEST.dumps(),
                                                   created=0.0, actor="local:root", mac="A" * 43))
    admin(url, Sealer(NEXT_KEK, [KEK])).rotate_kek()
    with pytest.raises(StoreError, match="release policy version 2 fails its MAC"):
        Store(url, Sealer(NEXT_KEK)).active_policy()
    assert Store(url, Sealer(NEXT_KEK)).get_policy(1).digest == PINNED.digest  # the operator's, MACed again


def test_a_database_made_before_policies_carried_a_mac_applies_none_of_them(tmp_path):
    url = f"sqlite:///{tmp_path}/kbs.db"
    with Store(url).engine.begin() as db:
        db.execute(text("ALTER TABLE policies DROP COLUMN mac"))
        db.execute(schema.policies.insert().values(version=1, digest=ANY_GUEST.digest, document=ANY_GUEST.dumps(),
                                                   created=0.0, actor="local:root"))
    with pytest.raises(StoreError, match="fails its MAC"):
        Store(url, Sealer(KEK)).active_policy()
    assert admin(url).put_policy(ANY_GUEST.dumps()) == (2, True)  # the same document, now believed
    assert Store(url, Sealer(KEK)).active_policy().version == 2


def test_a_policy_read_back_with_fewer_digits_is_still_believed(url):
    """PostgreSQL with extra_float_digits 0 gives a float back with 15 significant digits."""
    store = Store(url, SEALER)
    with store.engine.begin() as db:
        created = db.execute(select(schema.policies.c.created)).scalar()
        db.execute(update(schema.policies).values(created=float(f"{created + 0.123456:.15g}")))
    assert Store(url, SEALER).active_policy().digest == PINNED.digest


def test_a_forged_last_version_is_named_not_a_crash(url):
    with Store(url).engine.begin() as db:
        db.execute(schema.policies.insert().values(version=2**31 - 1, digest=ANY_GUEST.digest,
                                                   document=ANY_GUEST.dumps(), created=0.0, actor="x", mac=""))
    with pytest.raises(StoreError, match="version 2147483647, the last there can be"):
        admin(url).put_policy(PINNED.dumps())


def test_a_policy_put_by_an_actor_with_a_long_name_is_stored(postgres):
    """`serve --policy` names its file as the actor (config:PATH), `policy put --db` the login name
    ($USER): longer than the column (200 characters), PostgreSQL refused the row, and the server did
    not start (a DataError traceback). The row keeps what the audit record keeps: the name, cut."""
    from support.postgres import fresh_database

    actor = "config:/" + "d" * 250 + "/policy.json"
    with fresh_database(postgres) as url:
        store = Store(url, SEALER)
        assert Admin(store, SEALER, actor, "test").put_policy(PINNED.dumps()) == (1, True)
        stored = Store(url, SEALER).active_policy()
        assert stored.digest == PINNED.digest and stored.actor == actor[:200]
        store.close_connections()
