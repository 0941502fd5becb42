"""thingbridge: an MQTT-first IoT broker bridge."""

__version__ = "0.1.0"
