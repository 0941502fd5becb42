"""The transport-free core: every flow written once, reached from the MQTT and HTTP adapters.

It never imports aiohttp or amqtt; it takes and returns plain data and raises `core.errors`."""
