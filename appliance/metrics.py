"""Counters and gauges in one place, rendered in the Prometheus text format at /metrics."""

from __future__ import annotations

from typing import Any

HELP = {
    "intrapush_pushes_accepted_total": ("counter", "pushes committed to disk and answered 202"),
    "intrapush_deliveries_sent_total": ("counter", "pushes written to a device connection"),
    "intrapush_acks_total": ("counter", "acknowledgements received from devices"),
    "intrapush_deliveries_expired_total": ("counter", "inbox rows that outlived their TTL unacknowledged"),
    "intrapush_resyncs_total": ("counter", "resync notices sent after an inbox overflow"),
    "intrapush_mqtt_connects_accepted_total": ("counter", "MQTT logins accepted"),
    "intrapush_mqtt_connects_refused_total": ("counter", "MQTT connections refused before or at CONNECT"),
    "intrapush_devices_online": ("gauge", "devices connected now"),
    "intrapush_devices_enrolled": ("gauge", "active device tokens"),
    "intrapush_store_commits_total": ("counter", "SQLite transactions committed by the writer"),
    "intrapush_store_writes_total": ("counter", "writes committed (several per transaction when grouped)"),
    "intrapush_mqtt_connects_throttled_total": ("counter", "MQTT connections closed at accept: their source address "
                                                "was over its connect rate or connection cap"),
    "intrapush_device_ack_ids_bogus_total": ("counter", "acked ids naming no push in the device's inbox, dropped"),
    "intrapush_device_ack_ids_ignored_total": ("counter", "acked ids beyond limits.device_ack_ids_max in one ack"),
    "intrapush_device_messages_throttled_total": ("counter", "device hellos and acks dropped: over the device's "
                                                  "message rate"),
    "intrapush_device_hellos_refused_total": ("counter", "hellos whose cursor was not an int in [0, 2^63); "
                                              "the connection was closed"),
    "intrapush_devices_disconnected_total": ("counter", "device connections closed for keeping over their "
                                             "message rate"),
}


def snapshot(dispatcher: Any, broker: Any, store: Any, directory: Any) -> dict[str, float]:
    c = dispatcher.counters
    return {
        "intrapush_pushes_accepted_total": c["accepted"],
        "intrapush_deliveries_sent_total": c["delivered"],
        "intrapush_acks_total": c["acked"],
        "intrapush_deliveries_expired_total": c["expired"],
        "intrapush_resyncs_total": c["resyncs"],
        "intrapush_mqtt_connects_accepted_total": broker.accepted,
        "intrapush_mqtt_connects_refused_total": broker.refused,
        "intrapush_devices_online": len(dispatcher.online),
        "intrapush_devices_enrolled": len(directory.by_id),
        "intrapush_store_commits_total": store.commits,
        "intrapush_store_writes_total": store.committed_writes,
        "intrapush_mqtt_connects_throttled_total": broker.throttled,
        "intrapush_device_ack_ids_bogus_total": c["ack_ids_bogus"],
        "intrapush_device_ack_ids_ignored_total": c["ack_ids_ignored"],
        "intrapush_device_messages_throttled_total": c["device_throttled"],
        "intrapush_device_hellos_refused_total": c["hellos_refused"],
        "intrapush_devices_disconnected_total": c["devices_disconnected"],
    }


def render(values: dict[str, float]) -> str:
    lines = []
    for name, value in values.items():
        kind, text = HELP[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
    return "\n".join(lines) + "\n"
