"""tokendb: the async PostgreSQL data layer of an LLM API platform."""

from tokendb.connection import close as close
from tokendb.connection import connect as connect
from tokendb.connection import init as init
from tokendb.connection import migrate as migrate
from tokendb.errors import *  # noqa: F403
from tokendb.models import *  # noqa: F403
