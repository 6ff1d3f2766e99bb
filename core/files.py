"""Files in Redis: what clients upload for batches (OpenAI's Files API), kept per API key.

Every API process and worker reaches Redis, and files outlive restarts as the queue does, so a
file lives there: a hash `file:{id}` (its object: name, purpose, size, owner, creation time), a
string `file:{id}:data` (its bytes), per owner a sorted set `files:index:{owner}` of its ids in the
order they were stored, and the hash `files:bytes` of what each owner's files hold. One script checks the owner's budget and stores a
file, so two uploads at once cannot both overrun it.

The boundary for a larger deployment: `create`, `content` and `delete` are the only methods that
touch the bytes. An S3-compatible store behind them (the object under the same id) would keep the
records, the listing and the budget here and the bytes there.
"""

import time
import uuid
from dataclasses import dataclass

import redis

from core.redis_client import text

ANYONE = "*"  # the owner of every file when the API takes no keys
FILE_ID_PREFIX = "file-"
SEQUENCE_KEY = "files:sequence"
BYTES_KEY = "files:bytes"  # per owner, the bytes its files hold

# KEYS: the owners' bytes, record, data, owner's index, the files' sequence. ARGV: size, budget, id, data,
# owner, then the record's field/value pairs. The index is ordered by the sequence (creation times tie within a
# second). Returns {1, bytes used after} when stored (or already there: a file the server writes under an
# id of its own is written once), {0, bytes used} when it would overrun the budget.
_CREATE_LUA = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[5]) or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {1, used}
end
local size = tonumber(ARGV[1])
if used + size > tonumber(ARGV[2]) then
  return {0, used}
end
redis.call('SET', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[3])
return {1, redis.call('HINCRBY', KEYS[1], ARGV[5], size)}
"""

# KEYS: record, data, owner's index, the owners' bytes. ARGV: id, owner. Returns 1 when it was there.
_DELETE_LUA = """
local size = redis.call('HGET', KEYS[1], 'bytes')
if not size then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[2], -tonumber(size))
return 1
"""


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    owner: str


class OverBudget(Exception):
    """The owner's files would hold more than its budget."""

    def __init__(self, used: int, size: int, budget: int) -> None:
        super().__init__(
            f"this key's files hold {used} bytes; {size} more would pass its budget of {budget} bytes "
            f"(FILES_BYTES_PER_KEY): delete files it no longer needs"
        )


class FileStore:
    def __init__(self, client: redis.Redis, bytes_per_owner: int) -> None:
        self._redis = client
        self._budget = bytes_per_owner
        self._create = client.register_script(_CREATE_LUA)
        self._delete = client.register_script(_DELETE_LUA)

    def create(
        self, owner: str | None, filename: str, purpose: str, data: bytes, file_id: str | None = None,
        budget: int | None = None,
    ) -> StoredFile:
        """Store the file under a new id, or under `file_id` unless it is there already (what the server
        writes, once); raises OverBudget past `budget` (the key's, unless given)."""
        stored = StoredFile(
            id=file_id or FILE_ID_PREFIX + uuid.uuid4().hex, filename=filename, purpose=purpose, bytes=len(data),
            created_at=int(time.time()), owner=owner or ANYONE,
        )
        fields = [item for pair in _fields(stored).items() for item in pair]
        ok, used = self._create(
            keys=[BYTES_KEY, _record_key(stored.id), _data_key(stored.id), _index_key(stored.owner), SEQUENCE_KEY],
            args=[stored.bytes, self._budget if budget is None else budget, stored.id, data, stored.owner, *fields],
        )
        if not ok:
            raise OverBudget(int(used), stored.bytes, self._budget)
        return stored

    def get(self, file_id: str, owner: str | None) -> StoredFile | None:
        """The file, when it exists and `owner` may see it (one answer for both, so ids cannot be probed)."""
        if not file_id.startswith(FILE_ID_PREFIX):
            return None
        record = self._redis.hgetall(_record_key(file_id))
        stored = _stored(record) if record else None
        return stored if stored is not None and stored.owner == (owner or ANYONE) else None

    def content(self, stored: StoredFile) -> bytes:
        return self._redis.get(_data_key(stored.id)) or b""

    def listed(self, owner: str | None) -> list[StoredFile]:
        """The owner's files, oldest first."""
        ids = self._redis.zrange(_index_key(owner or ANYONE), 0, -1)
        with self._redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hgetall(_record_key(text(file_id)))
            records = pipe.execute()
        return [stored for record in records if record and (stored := _stored(record)) is not None]

    def delete(self, stored: StoredFile) -> bool:
        keys = [_record_key(stored.id), _data_key(stored.id), _index_key(stored.owner), BYTES_KEY]
        return bool(self._delete(keys=keys, args=[stored.id, stored.owner]))


def _record_key(file_id: str) -> str:
    return f"file:{file_id}"


def _data_key(file_id: str) -> str:
    return f"file:{file_id}:data"


def _index_key(owner: str) -> str:
    return f"files:index:{owner}"


def _fields(stored: StoredFile) -> dict[str, str | int]:
    return {"id": stored.id, "filename": stored.filename, "purpose": stored.purpose, "bytes": stored.bytes,
            "created_at": stored.created_at, "owner": stored.owner}


def _stored(record: dict) -> StoredFile | None:
    fields = {text(key): text(value) for key, value in record.items()}
    if "id" not in fields:
        return None
    return StoredFile(
        id=fields["id"], filename=fields["filename"], purpose=fields["purpose"], bytes=int(fields["bytes"]),
        created_at=int(fields["created_at"]), owner=fields["owner"],
    )
