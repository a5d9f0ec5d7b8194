"""The lab Mosquitto's configuration and ACL text (pure): TLS with client certificates, least privilege."""

from __future__ import annotations

from pathlib import Path

from appliance.lab.mosquitto import BrokerTls, broker_acl, broker_config


def test_tls_listener_demands_client_certificates_and_reads_the_key_as_root() -> None:
    tls = BrokerTls(Path("/x/ca.pem"), Path("/x/broker.pem"), Path("/x/broker.key"))
    lines = broker_config(18883, tls, acl_file=Path("/x/acl")).splitlines()
    assert "user root" in lines  # LAB-NOTES: mosquitto reads the key after dropping privileges
    assert "listener 18883 127.0.0.1" in lines
    assert {"cafile /x/ca.pem", "certfile /x/broker.pem", "keyfile /x/broker.key", "require_certificate true",
            "use_identity_as_username true", "acl_file /x/acl"} <= set(lines)
    assert not any(line.startswith("allow_anonymous") for line in lines)


def test_a_plain_listener_says_allow_anonymous_explicitly() -> None:
    lines = broker_config(11883, None).splitlines()
    assert "allow_anonymous true" in lines and not any(line.startswith("cafile") for line in lines)


def test_the_acl_gives_each_appliance_its_own_topics_only() -> None:
    acl = broker_acl(("dashboard",)).splitlines()
    assert acl[:4] == ["user vsa-lab-platform", "topic write vsa/+/wake", "topic read vsa/+/events",
                       "topic read vsa/+/status"]
    assert acl[4:6] == ["user dashboard", "topic readwrite vsa/#"]
    assert acl[6:] == ["pattern read vsa/%u/wake", "pattern write vsa/%u/events", "pattern write vsa/%u/status"]
