"""mor_client: the SDK institutions embed to join a MoR federation (reward scores only ever leave, never data)."""

from privacy.pki import ClientCredentials

from .client import ClientError, ClientThread, FederationClient
from .release import Release, ReleasePolicy
from mor.types import FunctionScorer, Scorer, ScoringItem

__all__ = ["ClientCredentials", "ClientError", "ClientThread", "FederationClient", "FunctionScorer", "Release",
           "ReleasePolicy", "Scorer", "ScoringItem"]
