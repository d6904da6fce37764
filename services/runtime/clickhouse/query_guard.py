"""The query door's guard: what SQL a caller may run on Flywheel's ClickHouse, judged on the parsed tree.

`readonly=1` stops writes, but not what a SELECT can reach: chDB runs ClickHouse in local mode, where
`file('/proc/self/environ')` reads the process's environment, and a server answers `url()`, `remote()`
or `system.users` to any user with the default grants. So every query is parsed with sqlglot's
ClickHouse dialect (a maintained parser: comments, quoting and case are the tokenizer's business, not
ours) and accepted only when it is ONE SELECT (UNION, CTEs and subqueries are SELECTs) that

- reads only Flywheel's own tables and views (the names the migrations create), unqualified or in the
  configured database; the parameterised views (`inference_metrics(bucket_s = N)`) are the only calls
  allowed where a table goes, so every table function (`file`, `url`, `s3`, `remote`, `cluster`,
  `numbers`, `input`, ...) is refused;
- calls only functions on an allow-list (below). An allow-list rather than a deny-list because
  ClickHouse has well over a thousand functions and adds more each release: a deny-list goes stale
  without anyone noticing, an allow-list fails loudly, naming the function, when a legitimate query
  needs one more;
- carries no `SETTINGS`, `FORMAT` or `INTO OUTFILE`, and no `{name:Identifier}` parameter (it would
  name a table the guard never saw).

What runs is the SQL sqlglot generates from the judged tree, not the caller's text: whatever the
parser understood is exactly what the engine gets, so a construct the two read differently cannot
slip through. The caps (`QueryLimits`) travel beside it as settings the caller cannot touch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from services.runtime.clickhouse.store import DEFAULT_DATABASE, ClickHouseError, ClickHouseStore, bind, load_migrations

if TYPE_CHECKING:
    import pyarrow
    from sqlglot import exp

DIALECT = "clickhouse"

# ClickHouse's own spelling; compared case-insensitively, so an allowed name in any case passes and
# `FiLe` is still `file`, which is not here. Grouped as the ClickHouse reference groups them.
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    name.lower()
    for name in """
    count sum avg min max any anyLast argMin argMax uniq uniqExact uniqCombined uniqCombined64 uniqHLL12 countDistinct
    quantile quantiles quantileExact quantileExactWeighted quantileTiming quantileTDigest quantilesTDigest quantilesExact median
    groupArray groupUniqArray groupArraySample topK sumMap minMap maxMap stddevPop stddevSamp varPop varSamp corr covarPop covarSamp
    simpleLinearRegression histogram entropy sumWithOverflow avgWeighted
    row_number rank dense_rank percent_rank cume_dist ntile lag lead lagInFrame leadInFrame first_value last_value nth_value
    if multiIf coalesce ifNull nullIf isNull isNotNull assumeNotNull toNullable greatest least
    equals notEquals less greater lessOrEquals greaterOrEquals and or not xor in notIn like notLike ilike notILike
    plus minus multiply divide intDiv intDivOrZero modulo moduloOrZero negate abs round roundBankers floor ceil ceiling trunc truncate
    sqrt cbrt exp exp2 exp10 log ln log2 log10 pow power sign isNaN isFinite isInfinite ifNotFinite e pi
    toString toFixedString toInt8 toInt16 toInt32 toInt64 toUInt8 toUInt16 toUInt32 toUInt64 toFloat32 toFloat64 toDecimal32 toDecimal64
    toInt32OrNull toInt64OrNull toUInt32OrNull toUInt64OrNull toFloat64OrNull toInt64OrZero toUInt64OrZero toFloat64OrZero toDecimal64OrNull
    toDate toDate32 toDateTime toDateTime64 toDateOrNull toDateTimeOrNull toDateTime64OrNull toUUID toUUIDOrNull toTypeName toLowCardinality
    cast accurateCast accurateCastOrNull toBool
    parseDateTimeBestEffort parseDateTimeBestEffortOrNull parseDateTime64BestEffort parseDateTime64BestEffortOrNull
    now now64 today yesterday toTimeZone timeZoneOf toUnixTimestamp toUnixTimestamp64Milli toUnixTimestamp64Micro fromUnixTimestamp fromUnixTimestamp64Milli
    toStartOfInterval toStartOfSecond toStartOfMinute toStartOfFiveMinutes toStartOfTenMinutes toStartOfFifteenMinutes toStartOfHour
    toStartOfDay toStartOfWeek toMonday toStartOfMonth toStartOfQuarter toStartOfYear timeSlot
    toYear toQuarter toMonth toWeek toISOWeek toDayOfYear toDayOfMonth toDayOfWeek toHour toMinute toSecond toYYYYMM toYYYYMMDD toYYYYMMDDhhmmss
    dateDiff date_diff age dateAdd date_add dateSub date_sub dateTrunc date_trunc formatDateTime
    addSeconds addMinutes addHours addDays addWeeks addMonths addYears subtractSeconds subtractMinutes subtractHours subtractDays
    subtractWeeks subtractMonths subtractYears toIntervalSecond toIntervalMinute toIntervalHour toIntervalDay toIntervalWeek
    toIntervalMonth toIntervalQuarter toIntervalYear
    length lengthUTF8 char_length character_length empty notEmpty lower upper lowerUTF8 upperUTF8 concat concatWithSeparator
    substring substr substringUTF8 left right leftPad rightPad trim trimBoth trimLeft trimRight ltrim rtrim reverse
    startsWith endsWith position positionCaseInsensitive locate match extract extractAll replaceAll replaceOne replace
    replaceRegexpAll replaceRegexpOne splitByChar splitByString splitByWhitespace arrayStringConcat countSubstrings
    multiSearchAny hasToken format lcase ucase
    JSONHas JSONLength JSONType JSONExtract JSONExtractString JSONExtractInt JSONExtractUInt JSONExtractFloat JSONExtractBool
    JSONExtractRaw JSONExtractArrayRaw JSONExtractKeys simpleJSONExtractString simpleJSONExtractInt simpleJSONExtractFloat simpleJSONHas
    array arrayJoin arrayMap arrayFilter arrayExists arrayAll arrayCount arraySum arrayAvg arrayMin arrayMax arraySort arrayReverseSort
    arrayDistinct arraySlice arrayElement arrayConcat arrayUniq arrayFirst arrayEnumerate arrayReverse has hasAll hasAny indexOf
    tuple tupleElement untuple map mapKeys mapValues mapContains
    cityHash64 sipHash64 xxHash64 murmurHash3_64 farmFingerprint64
    """.split()
)

# -If, -Distinct, ... turn an allowed aggregate into another aggregate over the same data (countIf,
# uniqExactIf, quantileIf); they read nothing new.
AGGREGATE_COMBINATORS = ("If", "Distinct", "OrNull", "OrDefault", "Array", "ForEach")
_AGGREGATES = frozenset(
    name.lower()
    for name in """count sum avg min max any anyLast argMin argMax uniq uniqExact uniqCombined uniqCombined64 uniqHLL12 quantile
    quantiles quantileExact quantileTiming quantileTDigest median groupArray groupUniqArray topK stddevPop stddevSamp varPop varSamp
    corr covarPop covarSamp avgWeighted""".split()
)

# Codes of the caps' refusals: the caller went over a limit, which is theirs to change (LIMIT, a
# narrower window, an aggregate), not an engine failure.
LIMIT_ERRORS = {
    159: "max_execution_time",
    160: "max_execution_time",
    396: "max_result_rows/max_result_bytes",
    241: "max_memory_usage",
}


class QueryRefused(Exception):
    """The guard will not run this query; `status` is 400 (not SQL it can read) or 403 (not allowed here)."""

    def __init__(self, message: str, *, status: int = 403, code: str = "query_refused") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class QueryOverLimit(Exception):
    """The engine stopped the query at one of the door's caps; the message names the cap."""

    def __init__(self, message: str, cap: str) -> None:
        super().__init__(message)
        self.cap = cap


@dataclass(frozen=True)
class QueryLimits:
    """Caps every guarded query runs under; `settings()` is what the engine enforces."""

    max_execution_time_s: int = 30
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 256 * 1024 * 1024
    max_memory_usage: int = 1024 * 1024 * 1024

    def settings(self) -> dict[str, int | str]:
        return {
            "max_execution_time": self.max_execution_time_s,
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            # throw, not break: a result cut short without saying so would be read as complete.
            "result_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_usage,
        }


@dataclass(frozen=True)
class FlywheelRelations:
    """Flywheel's tables and views, by the names its migrations create."""

    tables: frozenset[str]
    views: frozenset[str]

    @property
    def names(self) -> frozenset[str]:
        return self.tables | self.views


@cache
def migration_relations() -> FlywheelRelations:
    """The CREATE TABLE / CREATE VIEW names in the migrations, parsed by sqlglot, so the allow-list cannot drift."""
    import sqlglot
    from sqlglot import exp

    tables: set[str] = set()
    views: set[str] = set()
    for migration in load_migrations():
        for statement in migration.statements:
            # ALTER ... ADD INDEX is beyond sqlglot's grammar (it falls back with a warning); only CREATEs name relations.
            if not _CREATE.match(statement):
                continue
            created = sqlglot.parse_one(statement, read=DIALECT)
            if not isinstance(created, exp.Create):
                continue
            table = created.find(exp.Table)
            if table is None:
                continue
            (views if str(created.args.get("kind", "")).upper() == "VIEW" else tables).add(table.name)
    return FlywheelRelations(frozenset(tables), frozenset(views))


_CREATE = re.compile(r"^\s*(?:--[^\n]*\n\s*)*CREATE\b", re.IGNORECASE)


class QueryGuard:
    """Accepts one SELECT over Flywheel's tables and views with allowed functions; see the module's docstring."""

    def __init__(self, database: str = DEFAULT_DATABASE, relations: FlywheelRelations | None = None) -> None:
        self.database = database
        self.relations = relations or migration_relations()
        _quiet_command_fallback()

    def allowed_tables(self) -> str:
        return ", ".join(sorted(self.relations.names))

    def check(self, sql: str) -> str:
        """The SQL to run for `sql` (regenerated from the judged tree), or QueryRefused saying what is refused."""
        import sqlglot
        from sqlglot import exp
        from sqlglot.errors import ParseError, TokenError

        if "INTO OUTFILE" in _tokens_upper(sql):
            raise QueryRefused(
                "INTO OUTFILE is not allowed at the query door: results come back in the response, never to a file"
            )
        try:
            statements = [
                s for s in sqlglot.parse(sql, read=DIALECT) if s is not None and not isinstance(s, exp.Semicolon)
            ]
        except ParseError as error:
            raise QueryRefused(
                f"the query cannot be parsed as ClickHouse SQL: {_parse_error(error)}", status=400, code="query_invalid"
            ) from None
        except (TokenError, RecursionError, ValueError) as error:
            raise QueryRefused(
                f"the query cannot be parsed as ClickHouse SQL: {error}", status=400, code="query_invalid"
            ) from None
        if not statements:
            raise QueryRefused("the query is empty: send one SELECT", status=400, code="query_invalid")
        if len(statements) > 1:
            raise QueryRefused(
                f"the query door runs one statement per request; this has {len(statements)} (separated by `;`)"
            )
        [tree] = statements
        while isinstance(tree, exp.Subquery) and not tree.alias:
            tree = tree.this  # `(SELECT ...)`, parenthesised
        if not isinstance(tree, (exp.Select, exp.SetOperation)):
            keyword = _leading_keyword(sql)
            if keyword is None:
                # sqlglot reads a bare expression where a statement should start (`SELEC * ...`).
                raise QueryRefused(
                    "the query is not a SQL statement: a query starts with SELECT or WITH",
                    status=400,
                    code="query_invalid",
                )
            raise QueryRefused(f"the query door is readonly and runs one SELECT; {keyword} is not a SELECT")
        self._judge(tree)
        return tree.sql(dialect=DIALECT, comments=False)

    def run(
        self, store: ClickHouseStore, sql: str, parameters: Mapping[str, Any] | None, limits: QueryLimits
    ) -> pyarrow.Table:
        """Bind, judge and run `sql` under `limits`; QueryRefused, QueryOverLimit, or the engine's ClickHouseError."""
        # Binding first: parameters without `{name:Type}` placeholders are formatted into the text
        # client-side, so the text after binding is what must be judged.
        bound_sql, server_side = bind(sql, dict(parameters) if parameters else None)
        checked = self.check(bound_sql if isinstance(bound_sql, str) else bound_sql.decode())
        try:
            return store.query_arrow(checked, dict(parameters or {}) if server_side else None, limits=limits.settings())
        except ClickHouseError as error:
            cap = LIMIT_ERRORS.get(error.code or 0)
            if cap is None:
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            raise QueryOverLimit(
                f"the query went over the door's {cap} cap ({first}); narrow it with WHERE, LIMIT or an aggregate", cap
            ) from None

    # ------------------------------------------------------------------------------------ judging

    def _judge(self, tree: exp.Expression) -> None:
        from sqlglot import exp

        ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
        for node in tree.walk():
            if node.args.get("settings"):
                raise QueryRefused(
                    "SETTINGS is not allowed at the query door: its limits and readonly are fixed by the server"
                )
            if node.args.get("format") is not None and isinstance(node, exp.Query):
                raise QueryRefused("FORMAT is not allowed at the query door: the door returns JSON rows")
            if isinstance(node, (exp.DDL, exp.DML, exp.Command, exp.Set, exp.Use)):
                raise QueryRefused(
                    f"the query door is readonly and runs one SELECT; {node.key.upper()} is not allowed anywhere in it"
                )
            if isinstance(node, exp.Placeholder):
                self._judge_placeholder(node)
            elif isinstance(node, exp.Table):
                self._judge_table(node, ctes)
            elif isinstance(node, exp.In) and isinstance(node.args.get("field"), exp.Column):
                # `x IN feedback` reads the table `feedback` as a set.
                field = node.args["field"]
                self._judge_relation(field.name, field.table or None, ctes)
            elif (
                isinstance(node, exp.Column)
                and node.args.get("db") is not None
                and node.args["db"].name != self.database
            ):
                raise QueryRefused(
                    f"column {node.sql(dialect=DIALECT)} names database {node.args['db'].name!r}; the query door reads {self.database!r} only"
                )
            elif isinstance(node, exp.Func) and not (isinstance(node.parent, exp.Table) and node.arg_key == "this"):
                # A call where a table goes is a table function or a parameterised view: judged as a table.
                self._judge_function(node)
        for source in (*tree.find_all(exp.From), *tree.find_all(exp.Join)):
            relation = source.this
            while isinstance(relation, exp.Final):
                relation = relation.this
            if isinstance(source, exp.Join) and str(source.args.get("kind", "")).upper() == "ARRAY":
                continue  # ARRAY JOIN unfolds a column of a table already judged
            if not isinstance(relation, (exp.Table, exp.Subquery)):
                raise QueryRefused(
                    f"{relation.sql(dialect=DIALECT)[:80]} cannot be read at the query door: read one of its tables or views: {self.allowed_tables()}"
                )

    def _judge_placeholder(self, node: exp.Placeholder) -> None:
        from sqlglot import exp

        kind = node.args.get("kind")
        if not isinstance(kind, exp.DataType):
            name = node.name or "?"
            shown = kind.sql(dialect=DIALECT) if isinstance(kind, exp.Expression) else str(kind or "")
            raise QueryRefused(
                f"parameter {{{name}:{shown}}} is not allowed at the query door: "
                "parameters are values ({name:Type} with a data type), never identifiers"
            )

    def _judge_table(self, node: exp.Table, ctes: set[str]) -> None:
        from sqlglot import exp

        target = node.this
        if isinstance(target, exp.Placeholder):
            self._judge_placeholder(target)
        if isinstance(target, exp.Identifier):
            if node.args.get("catalog") is not None:
                raise QueryRefused(
                    f"{node.sql(dialect=DIALECT)} is not one of Flywheel's tables; allowed tables: {self.allowed_tables()}"
                )
            self._judge_relation(target.name, node.db or None, ctes)
            return
        if isinstance(target, exp.Anonymous) and target.name in self.relations.views and not node.db:
            # A parameterised view: `inference_metrics(bucket_s = 3600)`; its arguments are name = value pairs.
            for argument in target.expressions:
                if not (
                    isinstance(argument, exp.EQ)
                    and isinstance(argument.this, exp.Column)
                    and isinstance(argument.expression, (exp.Literal, exp.Placeholder, exp.Neg))
                ):
                    raise QueryRefused(
                        f"view {target.name}() takes parameters as name = value, got {argument.sql(dialect=DIALECT)[:80]}"
                    )
            return
        if isinstance(target, exp.Func):
            name = target.name if isinstance(target, exp.Anonymous) else target.sql_name().lower()
            raise QueryRefused(
                f"table function {name}() is not allowed at the query door: it reads outside Flywheel's tables; allowed tables: {self.allowed_tables()}"
            )
        raise QueryRefused(
            f"{node.sql(dialect=DIALECT)[:80]} is not one of Flywheel's tables; allowed tables: {self.allowed_tables()}"
        )

    def _judge_relation(self, name: str, database: str | None, ctes: set[str]) -> None:
        if database is None and name in ctes:
            return
        if database not in (None, self.database) or name not in self.relations.names:
            shown = f"{database}.{name}" if database else name
            raise QueryRefused(
                f"table {shown} is not allowed at the query door: it reads Flywheel's own tables and views only; allowed tables: {self.allowed_tables()}"
            )

    def _judge_function(self, node: exp.Func) -> None:
        from sqlglot import exp

        if isinstance(
            node,
            (
                exp.Anonymous,
                exp.AnonymousAggFunc,
                exp.CombinedAggFunc,
                exp.ParameterizedAgg,
                exp.CombinedParameterizedAgg,
            ),
        ):
            name = node.name
            if not _allowed_name(name):
                raise QueryRefused(
                    f"function {name}() is not allowed at the query door (it accepts a fixed list of aggregate, date, string, math, JSON and array functions)"
                )
            return
        if type(node) not in _allowed_typed_functions():
            name = node.sql(dialect=DIALECT).split("(", 1)[0][:60]
            raise QueryRefused(
                f"function {name}() is not allowed at the query door (it accepts a fixed list of aggregate, date, string, math, JSON and array functions)"
            )


class _CommandFallbackFilter(logging.Filter):
    """sqlglot warns, with the caller's text, whenever it reads a statement it has no grammar for as a
    Command; the guard refuses those with its own message, so the warning would only copy untrusted SQL
    into the logs at every refused query."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


_COMMAND_FALLBACK_FILTER = _CommandFallbackFilter()


def _quiet_command_fallback() -> None:
    logger = logging.getLogger("sqlglot")
    if _COMMAND_FALLBACK_FILTER not in logger.filters:
        logger.addFilter(_COMMAND_FALLBACK_FILTER)


def _allowed_name(name: str) -> bool:
    lowered = name.lower()
    if lowered in ALLOWED_FUNCTIONS:
        return True
    for combinator in AGGREGATE_COMBINATORS:
        suffix = combinator.lower()
        if lowered.endswith(suffix) and _allowed_name_base(lowered[: -len(suffix)]):
            return True
    return False


def _allowed_name_base(lowered: str) -> bool:
    if lowered in _AGGREGATES:
        return True
    return any(lowered.endswith(c.lower()) and _allowed_name_base(lowered[: -len(c)]) for c in AGGREGATE_COMBINATORS)


# Functions sqlglot writes itself from syntax rather than from a name: `a AND b`, `CASE`, `CAST(x AS T)`,
# `x::T`, `[1, 2]`, `EXTRACT(DAY FROM t)`, `INTERVAL`, `COLUMNS('re')`, `EXISTS (SELECT ...)` (whose subquery is judged like any other).
_SYNTAX_FUNCTIONS = (
    "And",
    "Or",
    "Xor",
    "Case",
    "If",
    "Cast",
    "TryCast",
    "Array",
    "Extract",
    "Count",
    "Columns",
    "Struct",
    "Tuple",
    "Interval",
    "Transform",
    "Exists",
)


@cache
def _allowed_typed_functions() -> frozenset[type]:
    """The sqlglot classes the allowed names parse into: a typed node is judged by the name that made it.

    What runs is regenerated from the class, so a class reached from an allowed name means an allowed
    function, whatever other spelling might also parse into it.
    """
    import sqlglot
    from sqlglot import exp

    classes: set[type] = {getattr(exp, name) for name in _SYNTAX_FUNCTIONS if hasattr(exp, name)}
    arguments = ("", "a", "a, b", "a, b, c", "a, b, c, d", "'second', a, b")
    spellings = {name for name in ALLOWED_FUNCTIONS} | {
        f"{base}{c}".lower() for base in _AGGREGATES for c in AGGREGATE_COMBINATORS
    }
    quiet = logging.getLogger("sqlglot")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name in spellings:
            for args in arguments:
                for call in (f"{name}({args})", f"{name}(0.5)({args})"):
                    try:
                        parsed = sqlglot.parse_one(f"SELECT {call}", read=DIALECT)
                    except Exception:  # noqa: BLE001, S112 - a spelling this arity does not fit; other arities are tried
                        continue
                    first = parsed.expressions[0] if parsed.expressions else None
                    if isinstance(first, exp.Func) and not isinstance(first, exp.Anonymous):
                        classes.add(type(first))
    finally:
        quiet.setLevel(level)
    return frozenset(classes)


def _tokens_upper(sql: str) -> str:
    """The query's tokens, comments dropped, upper-cased and space-joined (for keyword pairs the parser rejects)."""
    from sqlglot.dialects.dialect import Dialect

    try:
        tokens = Dialect.get_or_raise(DIALECT).tokenize(sql)
    except Exception:  # noqa: BLE001 - a text the tokenizer refuses is reported by the parser next
        return ""
    return " ".join(token.text.upper() for token in tokens if not token.token_type.name.endswith("STRING"))


def _leading_keyword(sql: str) -> str | None:
    """The statement's first keyword (DROP, INSERT, SET, ...), or None when it starts with no keyword at all."""
    from sqlglot.dialects.dialect import Dialect
    from sqlglot import TokenType

    try:
        tokens = Dialect.get_or_raise(DIALECT).tokenize(sql)
    except Exception:  # noqa: BLE001 - the caller reports the parse instead
        return None
    first = next((token for token in tokens if token.token_type != TokenType.L_PAREN), None)
    if first is None or first.token_type in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.NUMBER, TokenType.STRING):
        return None
    return first.text.upper()


def _parse_error(error: Exception) -> str:
    details = getattr(error, "errors", None) or []
    if details:
        first = details[0]
        near = (first.get("highlight") or "").strip()
        where = f"line {first.get('line')}, column {first.get('col')}"
        return f"{first.get('description', 'invalid syntax')} at {where}" + (f" (near {near!r})" if near else "")
    return str(error).splitlines()[0]
