"""Why intrapush's own connection to Mosquitto uses appliance/broker/mqtt_client.py and not paho-mqtt:
QoS 1 publishes of a 250-byte push to distinct device topics, until the broker acknowledged all of them,
and the CPU the publishing process spent. Needs Debian's mosquitto.

    python bench/client_choice.py [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appliance.broker.mosquitto_child import free_port  # noqa: E402
from appliance.broker.mqtt_client import MqttSession, topic_header  # noqa: E402

PAYLOAD = b"x" * 250


def paho_rate(port: int, n: int) -> tuple[float, float]:
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, rc, props):  # noqa: ANN001, ANN202
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-bench", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(65000)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(0.2)
    cpu, t = time.process_time(), time.perf_counter()
    for i in range(n):
        c.publish(f"push/d-{i % 10000:016x}/inbox", PAYLOAD, qos=1)
    done.wait(300)
    rate, cpu_us = n / (time.perf_counter() - t), (time.process_time() - cpu) / n * 1e6
    c.loop_stop()
    c.disconnect()
    return rate, cpu_us


async def own_rate(port: int, n: int) -> tuple[float, float]:
    s = MqttSession("127.0.0.1", port, "own-bench", "", "", on_message=lambda *a: None,
                    on_connected=lambda p: None, on_lost=lambda: None, subscriptions=[("bench/none", 0)])
    s.start()
    await asyncio.wait_for(s.connected.wait(), 5)
    topics = [topic_header(f"push/d-{i:016x}/inbox") for i in range(10000)]
    cpu, t = time.process_time(), time.perf_counter()
    for i in range(n):
        s.publish(topics[i % 10000], PAYLOAD)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let PUBACKs in, as the daemon's loop would
    while s._inflight or s._backlog:  # noqa: SLF001
        await asyncio.sleep(0.001)
    rate, cpu_us = n / (time.perf_counter() - t), (time.process_time() - cpu) / n * 1e6
    await s.close()
    return rate, cpu_us


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=20000)
    n = p.parse_args().messages
    port = free_port("127.0.0.1")
    conf = Path(tempfile.mkdtemp()) / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
                    f"user {os.environ.get('USER') or 'root'}\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        paho = paho_rate(port, n)
        own = asyncio.run(own_rate(port, n))
    finally:
        broker.terminate()
        broker.wait()
    print(f"paho-mqtt {mqtt.__version__ if hasattr(mqtt, '__version__') else ''}: {paho[0]:,.0f} publishes/s, "
          f"{paho[1]:.1f} us CPU each")
    print(f"mqtt_client.py: {own[0]:,.0f} publishes/s, {own[1]:.1f} us CPU each")


if __name__ == "__main__":
    main()
