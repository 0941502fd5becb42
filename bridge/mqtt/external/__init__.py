"""mqtt.mode external: devices connect to a RabbitMQ cluster's MQTT plugin (the engine). The bridge
answers the engine's HTTP auth backend (auth.py), consumes device traffic from a shared queue
(consumer.py), publishes to devices through the engine (link.py) and closes revoked things'
connections through its management API (management.py)."""
