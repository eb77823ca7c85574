"""Connection options shared by every Kafka client of the project."""

from __future__ import annotations

import ssl
from typing import Any

from stream.settings import Settings

# Maximum time in seconds that a producer of the command line tools waits to reach a broker.
CONNECT_TIMEOUT_S = 30.0


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Build the TLS context for SSL and SASL_SSL, or ``None`` for plaintext."""
    if "SSL" not in settings.kafka_security_protocol:
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
    return context


def client_options(settings: Settings) -> dict[str, Any]:
    """Return the security keyword arguments of aiokafka's clients."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options
