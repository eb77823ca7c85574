"""Online models, fusion and prequential evaluation: pure computation, no Kafka or Redis."""

from models.base import ItemCatalog, Model, ModelError
from models.engine import EngineConfig, Recommender

__all__ = ["EngineConfig", "ItemCatalog", "Model", "ModelError", "Recommender"]
