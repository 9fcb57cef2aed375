"""tokendb: the async PostgreSQL data layer of an LLM API platform.

Users with a token balance, hashed API keys, an append-only token ledger that
never overdraws or loses a charge, and chat sessions whose messages are
billed. Every public name is importable from here::

    import tokendb

    async with tokendb.connect("postgres://postgres@127.0.0.1/tokendb"):
        user = await tokendb.create_user(email="ada@example.com", password="…", name="Ada")
        await tokendb.charge(user=user, amount=42, reference_id=request_id)
"""

from tokendb.api_keys import issue_api_key as issue_api_key
from tokendb.api_keys import list_api_keys as list_api_keys
from tokendb.api_keys import revoke_api_key as revoke_api_key
from tokendb.api_keys import set_api_key_limit as set_api_key_limit
from tokendb.api_keys import verify_api_key as verify_api_key
from tokendb.api_keys import verify_cache_stats as verify_cache_stats
from tokendb.chats import ChatDiscrepancy as ChatDiscrepancy
from tokendb.chats import add_message as add_message
from tokendb.chats import audit_chats as audit_chats
from tokendb.chats import end_chat as end_chat
from tokendb.chats import get_chat as get_chat
from tokendb.chats import list_chats as list_chats
from tokendb.chats import list_messages as list_messages
from tokendb.chats import start_chat as start_chat
from tokendb.config import tortoise_app as tortoise_app
from tokendb.connection import close as close
from tokendb.connection import connect as connect
from tokendb.connection import init as init
from tokendb.connection import is_initialised as is_initialised
from tokendb.connection import migrate as migrate
from tokendb.connection import tortoise_orm as tortoise_orm
from tokendb.errors import ApiKeyExpired as ApiKeyExpired
from tokendb.errors import ApiKeyRevoked as ApiKeyRevoked
from tokendb.errors import CaptureExceedsHold as CaptureExceedsHold
from tokendb.errors import ChatSessionEnded as ChatSessionEnded
from tokendb.errors import ConfigurationError as ConfigurationError
from tokendb.errors import ConfigurationWarning as ConfigurationWarning
from tokendb.errors import DatabaseError as DatabaseError
from tokendb.errors import DatabaseTimeout as DatabaseTimeout
from tokendb.errors import DatabaseUnavailable as DatabaseUnavailable
from tokendb.errors import EmailTaken as EmailTaken
from tokendb.errors import HoldExpired as HoldExpired
from tokendb.errors import HoldNotActive as HoldNotActive
from tokendb.errors import InsufficientTokens as InsufficientTokens
from tokendb.errors import InvalidApiKey as InvalidApiKey
from tokendb.errors import InvalidCredentials as InvalidCredentials
from tokendb.errors import KeyLimitExceeded as KeyLimitExceeded
from tokendb.errors import NotFound as NotFound
from tokendb.errors import PermissionDenied as PermissionDenied
from tokendb.errors import ReferenceConflict as ReferenceConflict
from tokendb.errors import RefundExceedsCharge as RefundExceedsCharge
from tokendb.errors import TokenDBError as TokenDBError
from tokendb.errors import ValidationError as ValidationError
from tokendb.holds import HoldDiscrepancy as HoldDiscrepancy
from tokendb.holds import audit_holds as audit_holds
from tokendb.holds import capture as capture
from tokendb.holds import expire_holds as expire_holds
from tokendb.holds import get_available_balance as get_available_balance
from tokendb.holds import hold as hold
from tokendb.holds import list_holds as list_holds
from tokendb.holds import release as release
from tokendb.ledger import ChargeItem as ChargeItem
from tokendb.ledger import LedgerDiscrepancy as LedgerDiscrepancy
from tokendb.ledger import audit_ledger as audit_ledger
from tokendb.ledger import charge as charge
from tokendb.ledger import charge_many as charge_many
from tokendb.ledger import get_balance as get_balance
from tokendb.ledger import grant_bonus as grant_bonus
from tokendb.ledger import list_transactions as list_transactions
from tokendb.ledger import refund as refund
from tokendb.ledger import top_up as top_up
from tokendb.models import ApiKey as ApiKey
from tokendb.models import ChatMessage as ChatMessage
from tokendb.models import ChatSession as ChatSession
from tokendb.models import HoldStatus as HoldStatus
from tokendb.models import LimitPeriod as LimitPeriod
from tokendb.models import MessageRole as MessageRole
from tokendb.models import TokenHold as TokenHold
from tokendb.models import TokenTransaction as TokenTransaction
from tokendb.models import TransactionType as TransactionType
from tokendb.models import User as User
from tokendb.models import UserRole as UserRole
from tokendb.usage import UsageDiscrepancy as UsageDiscrepancy
from tokendb.usage import UsageRow as UsageRow
from tokendb.usage import audit_usage as audit_usage
from tokendb.usage import usage_report as usage_report
from tokendb.users import authenticate as authenticate
from tokendb.users import change_password as change_password
from tokendb.users import create_user as create_user
from tokendb.users import get_user as get_user
from tokendb.users import list_users as list_users
from tokendb.users import set_role as set_role

__version__ = "0.1.0"

__all__ = [
    "ApiKey",
    "ApiKeyExpired",
    "ApiKeyRevoked",
    "CaptureExceedsHold",
    "ChargeItem",
    "ChatDiscrepancy",
    "ChatMessage",
    "ChatSession",
    "ChatSessionEnded",
    "ConfigurationError",
    "ConfigurationWarning",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "EmailTaken",
    "HoldDiscrepancy",
    "HoldExpired",
    "HoldNotActive",
    "HoldStatus",
    "InsufficientTokens",
    "InvalidApiKey",
    "InvalidCredentials",
    "KeyLimitExceeded",
    "LedgerDiscrepancy",
    "LimitPeriod",
    "MessageRole",
    "NotFound",
    "PermissionDenied",
    "ReferenceConflict",
    "RefundExceedsCharge",
    "TokenDBError",
    "TokenHold",
    "TokenTransaction",
    "TransactionType",
    "UsageDiscrepancy",
    "UsageRow",
    "User",
    "UserRole",
    "ValidationError",
    "add_message",
    "audit_chats",
    "audit_holds",
    "audit_ledger",
    "audit_usage",
    "authenticate",
    "capture",
    "change_password",
    "charge",
    "charge_many",
    "close",
    "connect",
    "create_user",
    "end_chat",
    "expire_holds",
    "get_available_balance",
    "get_balance",
    "get_chat",
    "get_user",
    "grant_bonus",
    "hold",
    "init",
    "is_initialised",
    "issue_api_key",
    "list_api_keys",
    "list_chats",
    "list_holds",
    "list_messages",
    "list_transactions",
    "list_users",
    "migrate",
    "refund",
    "release",
    "revoke_api_key",
    "set_api_key_limit",
    "set_role",
    "start_chat",
    "top_up",
    "tortoise_app",
    "tortoise_orm",
    "usage_report",
    "verify_api_key",
    "verify_cache_stats",
]
