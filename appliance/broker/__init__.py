"""The MQTT side of the box. Only this package imports an MQTT library."""
