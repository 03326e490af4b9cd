"""A hostile device on the LAN, holding valid credentials, on both broker backends: every SUBSCRIBE outside
its own inbox is refused (SUBACK failure code, or the connection closed), every PUBLISH outside its own
hello/ack/status reaches nobody, and while it holds every filter it could think of, another device's acks
all reach the box (#9).

The attacks come from paho-mqtt (MQTT 3.1.1, and MQTT 5 where the backend speaks it), from Debian's
mosquitto_sub/mosquitto_pub and from raw packets.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.broker.mosquitto import ACKS
from appliance.broker.topics import mqtt_packet, mqtt_string
from tests.appliance.test_broker_hardening import closed_within, connect_packet, read_packet
from tests.conftest import BACKENDS, Box, PahoDevice, backend_param, wait_for

backend = pytest.fixture(scope="module", params=BACKENDS)(backend_param)  # every test runs on both brokers

BOX_ACK_GROUP = ACKS[0].split("/")[1]  # the Mosquitto backend's own shared subscription on acks
PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
EMBEDDED_SPEAKS = ("3.1.1",)  # the embedded broker refuses MQTT 5 at CONNECT (test_broker_hardening)


def foreign_filters(own: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Every filter a device might try beyond its own inbox: wildcards, the box's own subscriptions, another
    device's topics, the broker's topics, shared subscriptions (one with the box's real group name)."""
    me, them = own["mqtt"]["client_id"], other["mqtt"]["client_id"]
    return [
        "#", "+", "+/+/+", "+/+/ack", "push/#", "push/+", "push/+/+", "push/+/ack", "push/+/hello", "push/+/status",
        "push/+/inbox", f"push/{them}/inbox", f"push/{them}/ack", f"push/{them}/#", f"push/{me}/#", f"push/{me}/+",
        f"push/{me}/ack", f"push/{me}/hello", f"push/{me}/status", "$SYS/#", "$SYS/broker/log/#",
        "$SYS/broker/log/M/subscribe", "$CONTROL/#", "$CONTROL/dynamic-security/v1/response",
        "$share/g/push/+/ack", f"$share/{BOX_ACK_GROUP}/push/+/ack", f"$share/{BOX_ACK_GROUP}/push/+/hello",
        f"$share/{BOX_ACK_GROUP}/#", f"$share/g/push/{them}/inbox", f"$share/g/push/{me}/inbox",
        f"$share/{BOX_ACK_GROUP}/push/{them}/ack", "$queue/push/+/ack", "$share/g/#",
    ]


class Attacker:
    """An enrolled device driven by paho-mqtt that records every SUBACK and every message it is sent."""

    def __init__(self, enrollment: dict[str, Any], port: int, protocol: str) -> None:
        self.e = enrollment
        self.protocol = protocol
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.pubacks: queue.Queue[Any] = queue.Queue()
        self.disconnected = False
        m = enrollment["mqtt"]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m["client_id"],
                                  protocol=PROTOCOLS[protocol])
        self.client.username_pw_set(m["username"], m["password"])
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(list(codes))
        self.client.on_message = lambda c, u, msg: self.received.put((msg.topic, msg.payload))
        self.client.on_publish = lambda c, u, mid, rc, props: self.pubacks.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: setattr(self, "disconnected", True)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        rc = self.connack.get(timeout=10)
        assert not rc.is_failure, rc

    def try_subscribe(self, topic_filter: str) -> list[Any] | None:
        """The SUBACK's reason codes, or None when the broker closed the connection instead."""
        self.client.subscribe(topic_filter, qos=1)
        try:
            return self.subacks.get(timeout=5)
        except queue.Empty:
            assert self.disconnected, f"no SUBACK and no disconnect for {topic_filter!r}"
            return None

    def seen(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def speaks(box: Box, protocol: str) -> None:
    if box.backend == "embedded" and protocol not in EMBEDDED_SPEAKS:
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")


def new_app(box: Box) -> dict[str, str]:
    return box.create_app("iso-" + uuid.uuid4().hex[:8])


def mosquitto_sub(box: Box, e: dict[str, Any], filters: list[str], version: str,
                  extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    m = e["mqtt"]
    args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(box.mqtt_port), "-i", m["client_id"], "-u",
            m["username"], "-P", m["password"], "-V", {"3.1.1": "mqttv311", "5": "mqttv5"}[version], "-q", "1",
            "-v", "-d", *extra]
    for topic_filter in filters:
        args += ["-t", topic_filter]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def granted_codes(debug_output: str) -> list[int]:
    """The reason codes of mosquitto_sub's first SUBACK, from its `-d` line "Subscribed (mid: 1): 128, 0"."""
    for line in debug_output.splitlines():
        if line.startswith("Subscribed (mid:"):
            return [int(code) for code in line.split(":", 2)[2].split(",")]
    raise AssertionError(f"no SUBACK in mosquitto_sub's output:\n{debug_output}")


def push_and_ack(box: Box, app: dict[str, str], victim: PahoDevice, token: str, count: int) -> list[str]:
    """`count` pushes to the victim, each acked as it arrives; returns their ids once the status API shows
    every one acked."""
    with box.api(app) as api:
        ids = []
        for n in range(count):
            r = api.post("/v1/messages", json={"to": {"token": token}, "title": f"v{n}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        for _ in ids:
            victim.ack([victim.next()["id"]])
        for message_id in ids:
            wait_for(lambda: api.get(f"/v1/messages/{message_id}").json()["counts"]["acked"] == 1, timeout=15)
    return ids


# -- SUBSCRIBE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_paho_device_subscribe_outside_its_inbox_is_refused(shared_box: Box, protocol: str) -> None:
    speaks(shared_box, protocol)
    app = new_app(shared_box)
    me, other = shared_box.enroll(app, "attacker"), shared_box.enroll(app, "other")
    attacker = Attacker(me, shared_box.mqtt_port, protocol)
    try:
        for topic_filter in foreign_filters(me, other):
            if attacker.disconnected:  # refused by closing: come back for the next filter
                attacker.close()
                attacker = Attacker(me, shared_box.mqtt_port, protocol)
            codes = attacker.try_subscribe(topic_filter)
            assert codes is None or all(code.is_failure for code in codes), (topic_filter, codes)
        if attacker.disconnected:
            attacker.close()
            attacker = Attacker(me, shared_box.mqtt_port, protocol)
        codes = attacker.try_subscribe(me["inbox_topic"])  # its own inbox still works
        assert codes is not None and not codes[0].is_failure
    finally:
        attacker.close()


@pytest.mark.parametrize("version", list(PROTOCOLS))
def test_mosquitto_sub_outside_its_inbox_is_refused(shared_box: Box, version: str) -> None:
    speaks(shared_box, version)
    app = new_app(shared_box)
    me, other = shared_box.enroll(app, "mosq-attacker"), shared_box.enroll(app, "mosq-other")
    filters = foreign_filters(me, other)
    proc = mosquitto_sub(shared_box, me, filters, version)
    out, _ = proc.communicate(timeout=15)
    codes = granted_codes(out)
    assert len(codes) == len(filters) and all(code >= 0x80 for code in codes), list(zip(filters, codes))
    assert "All subscription requests were denied" in out


# name: (filter bytes, must close): MQTT 3.1.1 calls ill-formed UTF-8, U+0000 and an empty filter malformed,
# so both backends close the connection; a misplaced wildcard is refused (0x80) or closes it.
ODD_FILTERS = {
    "empty": (b"", True),
    "nul": (b"push/\x00/inbox", True),
    "overlong-utf8-slash": (b"push\xc0\xafx", True),
    "surrogate": (b"push/\xed\xa0\x80/inbox", True),
    "not-utf8": (b"\xff\xfe", True),
    "hash-inside": (b"push/#/inbox", False),
    "plus-glued": (b"push/a+/inbox", False),
}


def raw_login(box: Box, e: dict[str, Any], level: int) -> socket.socket:
    """A raw MQTT 3.1.1 (level 4) or MQTT 5 (level 5: empty property lists) session of enrolled device `e`."""
    m = e["mqtt"]
    props = b"\x00" if level == 5 else b""
    sock = socket.create_connection(("127.0.0.1", box.mqtt_port), timeout=5)
    sock.sendall(mqtt_packet(0x10, mqtt_string("MQTT") + bytes([level, 0xC2]) + b"\x00\x3c" + props
                             + mqtt_string(m["client_id"]) + mqtt_string(m["username"]) + mqtt_string(m["password"])))
    kind, body = read_packet(sock)
    assert kind == 0x20 and body[1] == 0, body
    return sock


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("name", list(ODD_FILTERS))
def test_odd_subscribe_filter_is_refused_or_closes_the_connection(shared_box: Box, name: str, protocol: str) -> None:
    speaks(shared_box, protocol)
    topic_filter, must_close = ODD_FILTERS[name]
    level = {"3.1.1": 4, "5": 5}[protocol]
    sock = raw_login(shared_box, shared_box.enroll(new_app(shared_box), "odd"), level)
    try:
        props = b"\x00" if level == 5 else b""
        sock.sendall(mqtt_packet(0x82, b"\x00\x07" + props + mqtt_string(topic_filter) + b"\x01"))
        try:
            kind, body = read_packet(sock)
        except (ConnectionError, OSError):
            return  # closed: refused
        if kind == 0xE0:  # MQTT 5 DISCONNECT "malformed packet", then closed
            assert body[:1] == b"\x81" and closed_within(sock, 5), body
            return
        assert not must_close, (name, kind, body)
        assert kind == 0x90 and body[len(body) - 1] >= 0x80, (name, body)
    finally:
        sock.close()


def test_own_inbox_among_foreign_filters_gets_one_code_each(shared_box: Box) -> None:
    """One SUBSCRIBE with several filters: a code per filter, in order; only the own inbox is granted."""
    app = new_app(shared_box)
    me, other = shared_box.enroll(app, "multi"), shared_box.enroll(app, "multi-other")
    m = me["mqtt"]
    filters = ["#", me["inbox_topic"], other["inbox_topic"], f"$share/{BOX_ACK_GROUP}/push/+/ack"]
    sock = socket.create_connection(("127.0.0.1", shared_box.mqtt_port), timeout=5)
    try:
        sock.sendall(connect_packet(m["client_id"], m["username"], m["password"]))
        assert read_packet(sock)[1][1] == 0
        body = b"\x00\x09" + b"".join(mqtt_string(f) + b"\x01" for f in filters)
        sock.sendall(mqtt_packet(0x82, body))
        kind, suback = read_packet(sock)
        assert kind == 0x90 and suback == b"\x00\x09" + bytes([0x80, 0x01, 0x80, 0x80])
    finally:
        sock.close()


def test_device_holding_every_foreign_filter_loses_no_ack_of_another_device(shared_box: Box) -> None:
    """The attack of #9: a device joins the box's shared subscription on acks; Mosquitto would then hand it a
    share of every device's acks and drop them. Every victim ack must still reach the box."""
    app = new_app(shared_box)
    me, victim_e = shared_box.enroll(app, "holder"), shared_box.enroll(app, "victim")
    spare = shared_box.enroll(app, "holder-2")
    filters = foreign_filters(me, victim_e)
    protocol = "5" if shared_box.backend == "mosquitto" else "3.1.1"
    attacker = Attacker(me, shared_box.mqtt_port, protocol)
    # A second attacker, mosquitto_sub, holds the box's group too, and stays connected while it does.
    holder = mosquitto_sub(shared_box, spare, [f"$share/{BOX_ACK_GROUP}/push/+/ack", "#", spare["inbox_topic"]],
                           protocol)
    victim = PahoDevice(victim_e, shared_box.mqtt_port).connect()
    try:
        for topic_filter in filters:
            if attacker.disconnected:
                attacker.close()
                attacker = Attacker(me, shared_box.mqtt_port, protocol)
            attacker.try_subscribe(topic_filter)
        assert not attacker.disconnected
        push_and_ack(shared_box, app, victim, victim_e["token"], 40)
        assert victim.nothing_within(0.5)  # nothing was redelivered: every ack counted the first time
        assert attacker.seen() == []
        assert holder.poll() is None  # still connected: it held its filters all along
    finally:
        victim.close()
        attacker.close()
        holder.kill()
    out, _ = holder.communicate(timeout=5)
    received = [line for line in out.splitlines() if line.startswith(("push/", "$"))]
    assert received == [], received


# -- PUBLISH -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_device_publish_outside_its_own_topics_reaches_nobody(shared_box: Box, protocol: str) -> None:
    speaks(shared_box, protocol)
    app = new_app(shared_box)
    me, victim_e = shared_box.enroll(app, "forger"), shared_box.enroll(app, "target")
    victim = PahoDevice(victim_e, shared_box.mqtt_port).connect()
    attacker = Attacker(me, shared_box.mqtt_port, protocol)
    them = victim_e["mqtt"]["client_id"]
    try:
        with shared_box.api(app) as api:
            r = api.post("/v1/messages", json={"to": {"token": victim_e["token"]}, "title": "pending"})
            pending = r.json()["id"]
            assert victim.next()["id"] == pending  # delivered, not acked yet
            forged = [
                (victim_e["inbox_topic"], {"id": "forged", "seq": 99, "title": "forged"}),
                (victim_e["hello_topic"], {"cursor": 0}),
                (victim_e["ack_topic"], {"ids": [pending], "state": "opened"}),
                (victim_e["status_topic"], {"online": False}),
                ("$SYS/broker/log/N", "New client connected from 1.2.3.4 as x (p2, c1, k60)."),
                ("$CONTROL/dynamic-security/v1", {"commands": [{"command": "deleteClient", "username": them}]}),
                ("$share/g/push/x/ack", {"ids": [pending], "state": "opened"}),
                (f"$share/{BOX_ACK_GROUP}/push/{them}/ack", {"ids": [pending], "state": "opened"}),
                ("push/" + them, {}), ("push", {}), ("$queue/push/x/ack", {}),
            ]
            for topic, doc in forged:
                info = attacker.client.publish(topic, json.dumps(doc), qos=1)
                info.wait_for_publish(5)
                rc = attacker.pubacks.get(timeout=5)
                if protocol == "5" and shared_box.backend == "mosquitto":
                    assert rc.is_failure, (topic, rc)  # PUBACK "not authorized" (0x87)
            assert victim.nothing_within(1.0)  # no forged push, no redelivery from a forged hello
            status = api.get(f"/v1/messages/{pending}").json()
            assert status["counts"]["acked"] == 0 and status["counts"]["delivered"] == 1
            device = api.get(f"/v1/devices/{victim_e['token']}").json()
            assert device["online"] is True  # neither the forged will nor the forged deleteClient took it down
            assert victim.disconnects.empty()
            assert attacker.seen() == []
    finally:
        attacker.close()
        victim.close()


@pytest.mark.parametrize("topic", ["push/+/ack", "push/#", "+", "#"])
def test_publish_to_a_wildcard_topic_name_closes_the_connection(shared_box: Box, topic: str) -> None:
    app = new_app(shared_box)
    me = shared_box.enroll(app, "wild")
    m = me["mqtt"]
    sock = socket.create_connection(("127.0.0.1", shared_box.mqtt_port), timeout=5)
    try:
        sock.sendall(connect_packet(m["client_id"], m["username"], m["password"]))
        assert read_packet(sock)[1][1] == 0
        sock.sendall(mqtt_packet(0x32, mqtt_string(topic) + b"\x00\x01" + b"{}"))
        assert closed_within(sock, 5)
    finally:
        sock.close()


def test_mosquitto_pub_into_another_device_reaches_nobody(shared_box: Box) -> None:
    app = new_app(shared_box)
    me, victim_e = shared_box.enroll(app, "mosq-forger"), shared_box.enroll(app, "mosq-target")
    victim = PahoDevice(victim_e, shared_box.mqtt_port).connect()
    m = me["mqtt"]
    try:
        for topic in (victim_e["inbox_topic"], victim_e["hello_topic"], victim_e["status_topic"],
                      "$CONTROL/dynamic-security/v1", "$SYS/broker/log/N"):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(shared_box.mqtt_port), "-i", m["client_id"],
                            "-u", m["username"], "-P", m["password"], "-q", "1", "-t", topic, "-m",
                            json.dumps({"id": "forged", "cursor": 0, "online": False})],
                           capture_output=True, text=True, timeout=15)
        assert victim.nothing_within(1.0)
        with shared_box.api(app) as api:
            assert api.get(f"/v1/devices/{victim_e['token']}").json()["online"] is True
        assert victim.disconnects.empty()
    finally:
        victim.close()


def test_will_on_another_devices_status_never_marks_it_offline(shared_box: Box) -> None:
    app = new_app(shared_box)
    me, victim_e = shared_box.enroll(app, "will-forger"), shared_box.enroll(app, "will-target")
    victim = PahoDevice(victim_e, shared_box.mqtt_port).connect()
    m = me["mqtt"]
    try:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m["client_id"], protocol=mqtt.MQTTv311)
        client.username_pw_set(m["username"], m["password"])
        client.will_set(victim_e["status_topic"], b'{"online":false}', qos=1)
        try:
            client.connect("127.0.0.1", shared_box.mqtt_port, keepalive=30)
            client.loop(2)
            sock = client.socket()
            if sock is not None:  # None: refused at CONNECT and closed (the embedded broker)
                sock.close()  # gone without DISCONNECT: the will fires, if it was accepted
        except OSError:
            pass  # refused at CONNECT
        with shared_box.api(app) as api:
            assert victim.nothing_within(1.0)
            assert api.get(f"/v1/devices/{victim_e['token']}").json()["online"] is True
    finally:
        victim.close()


def test_mqtt5_subscription_identifier_and_options_do_not_widen_access(shared_box: Box) -> None:
    speaks(shared_box, "5")
    app = new_app(shared_box)
    me, other = shared_box.enroll(app, "opts"), shared_box.enroll(app, "opts-other")
    attacker = Attacker(me, shared_box.mqtt_port, "5")
    try:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = 7
        options = mqtt.SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
        attacker.client.subscribe([("push/+/ack", options), (f"$share/{BOX_ACK_GROUP}/push/+/ack", options)],
                                  properties=props)
        codes = attacker.subacks.get(timeout=5)
        assert all(code.is_failure for code in codes), codes
        assert other["inbox_topic"]  # (the other device exists: its topics are real)
    finally:
        attacker.close()


@pytest.mark.parametrize("client_id", ["intrapush-box", "intrapush-box-1", "intrapush"])
def test_device_login_under_the_box_own_client_ids_is_refused(shared_box: Box, client_id: str) -> None:
    """A device's login is bound to its own client id: it cannot take the place (and the shared subscription)
    of one of the box's own connections on Mosquitto."""
    app = new_app(shared_box)
    me, victim_e = shared_box.enroll(app, "impostor"), shared_box.enroll(app, "impostor-victim")
    victim = PahoDevice(victim_e, shared_box.mqtt_port).connect()
    m = me["mqtt"]
    sock = socket.create_connection(("127.0.0.1", shared_box.mqtt_port), timeout=5)
    try:
        sock.sendall(connect_packet(client_id, m["username"], m["password"]))
        kind, body = read_packet(sock)
        assert kind == 0x20 and body[1] in (4, 5), body
        assert closed_within(sock, 5)
        push_and_ack(shared_box, app, victim, victim_e["token"], 5)  # the box's connections are all still there
    finally:
        sock.close()
        victim.close()
