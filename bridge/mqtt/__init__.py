"""The MQTT adapter: the embedded amqtt broker, hardened, with per-thing identity and ACL."""
