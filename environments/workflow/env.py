"""Workflow: resolve a customer-support ticket over a small shop database (tau-bench style).

Each task seeds a SQLite database (customers, orders, tickets, policies) and asks the agent to
resolve one ticket: a cancellation, a refund or an address change. The tools act on the
database without checking policy, as a real back office would; following the policy is the
agent's job. The verifier replays the oracle's write actions on a fresh copy of the seeded
database and compares the two final states row by row: reward 1 if they are identical, else 0,
with the differing rows in the reward detail.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any, Literal, Sequence

import numpy as np

from environments.core import ChatEnv, Message, Resources, Task, assistant, count_assistant_turns
from environments.tools import Tool, Toolbox, ToolError, make_tool

TABLES = {
    "customers": "id TEXT PRIMARY KEY, name TEXT, email TEXT",
    "orders": ("id TEXT PRIMARY KEY, customer_id TEXT, item TEXT, amount REAL, status TEXT, "
               "days_since_delivery INTEGER, address TEXT, refunded INTEGER"),
    "tickets": ("id TEXT PRIMARY KEY, customer_id TEXT, order_id TEXT, kind TEXT, message TEXT, status TEXT, "
                "outcome TEXT"),
    "policies": "name TEXT PRIMARY KEY, text TEXT",
}
FIRST = ["Ada", "Ben", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
LAST = ["Ng", "Okafor", "Silva", "Weber", "Kim", "Novak", "Haddad", "Berg"]
ITEMS = [("kettle", 39.0), ("desk lamp", 24.5), ("backpack", 59.9), ("headphones", 89.0),
         ("coffee grinder", 45.0), ("yoga mat", 19.99), ("monitor", 179.0), ("keyboard", 69.0)]
STREETS = ["Elm St", "Oak Ave", "Harbour Rd", "Mill Lane", "Station Sq", "Kings Way"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Hillview"]
STATUSES = ["pending", "shipped", "delivered", "cancelled"]
SYSTEM = ("You are a support agent of an online shop. Read the ticket, look up its order, read the "
          "policy for the request (cancellation, refund or address_change), act only as the policy allows, "
          "then close the ticket with outcome 'resolved' or 'denied'.")


def _address(r: random.Random) -> str:
    return f"{r.randint(1, 199)} {r.choice(STREETS)}, {r.choice(CITIES)}"


def build_database(seed: int) -> tuple[sqlite3.Connection, dict[str, Any]]:
    """The seeded shop and the task on it: {'ticket', 'order', 'kind', 'new_address'}."""
    r = random.Random(seed)
    db = sqlite3.connect(":memory:", check_same_thread=False)
    for name, cols in TABLES.items():
        db.execute(f"CREATE TABLE {name}({cols})")
    window = r.choice([14, 30])
    db.executemany("INSERT INTO policies VALUES (?,?)", [
        ("cancellation", "An order can be cancelled only while its status is 'pending'."),
        ("refund", f"A delivered order can be refunded once, within {window} days of delivery."),
        ("address_change", "The shipping address can be changed only while the order is 'pending'."),
    ])
    customers = [(f"C{i:03d}", f"{f} {last}", f"{f.lower()}.{last.lower()}@example.com")
                 for i, (f, last) in enumerate(zip(r.sample(FIRST, 6), r.choices(LAST, k=6), strict=True), start=1)]
    db.executemany("INSERT INTO customers VALUES (?,?,?)", customers)
    orders = []
    for i in range(12):
        item, price = r.choice(ITEMS)
        status = r.choice(STATUSES)
        days = r.randint(1, 60) if status == "delivered" else None
        orders.append((f"O{1001 + i}", r.choice(customers)[0], item, price, status, days, _address(r), 0))
    db.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?,?,?)", orders)
    kinds = ["cancellation", "refund", "address_change"]
    tickets = []
    for j, o in enumerate(r.sample(orders, 4)):
        kind = r.choice(kinds)
        new_address = _address(r)
        message = {"cancellation": f"Please cancel my order {o[0]}.",
                   "refund": f"I would like a refund for order {o[0]} ({o[2]}).",
                   "address_change": f"Please ship order {o[0]} to {new_address} instead."}[kind]
        tickets.append((f"T{j + 1:02d}", o[1], o[0], kind, message, "open", None, new_address))
    db.executemany("INSERT INTO tickets VALUES (?,?,?,?,?,?,?)", [t[:7] for t in tickets])
    db.commit()
    target = r.choice(tickets)
    return db, {"ticket": target[0], "order": target[2], "kind": target[3], "new_address": target[7],
                "refund_window_days": window}


class Shop:
    """The back-office tools, bound to one database."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def _row(self, table: str, key: str) -> dict[str, Any]:
        cur = self.db.execute(f"SELECT * FROM {table} WHERE id = ?", (key,))
        row = cur.fetchone()
        if row is None:
            raise ToolError(f"no {table[:-1]} with id {key!r}")
        return dict(zip([c[0] for c in cur.description], row, strict=True))

    def get_ticket(self, ticket_id: str) -> dict[str, Any]:
        """Read a support ticket.

        Args:
            ticket_id: e.g. "T01".
        """
        return self._row("tickets", ticket_id)

    def get_order(self, order_id: str) -> dict[str, Any]:
        """Read an order: item, amount, status, days since delivery, address, refunded flag.

        Args:
            order_id: e.g. "O1001".
        """
        return self._row("orders", order_id)

    def get_customer(self, customer_id: str) -> dict[str, Any]:
        """Read a customer record.

        Args:
            customer_id: e.g. "C001".
        """
        return self._row("customers", customer_id)

    def read_policy(self, name: str) -> str:
        """Read a shop policy.

        Args:
            name: "cancellation", "refund" or "address_change".
        """
        row = self.db.execute("SELECT text FROM policies WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ToolError(f"no policy {name!r}; policies: cancellation, refund, address_change")
        return row[0]

    def cancel_order(self, order_id: str) -> str:
        """Cancel an order.

        Args:
            order_id: the order to cancel.
        """
        self._row("orders", order_id)
        self.db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))
        return f"order {order_id} cancelled"

    def refund_order(self, order_id: str) -> str:
        """Refund an order's full amount to the customer.

        Args:
            order_id: the order to refund.
        """
        self._row("orders", order_id)
        self.db.execute("UPDATE orders SET refunded = 1 WHERE id = ?", (order_id,))
        return f"order {order_id} refunded"

    def update_address(self, order_id: str, address: str) -> str:
        """Change an order's shipping address.

        Args:
            order_id: the order.
            address: the new address, exactly as the customer wrote it.
        """
        self._row("orders", order_id)
        self.db.execute("UPDATE orders SET address = ? WHERE id = ?", (address, order_id))
        return f"order {order_id} will ship to {address}"

    def close_ticket(self, ticket_id: str, outcome: Literal["resolved", "denied"]) -> str:
        """Close a ticket.

        Args:
            ticket_id: the ticket.
            outcome: "resolved" if the request was carried out, "denied" if the policy forbids it.
        """
        self._row("tickets", ticket_id)
        self.db.execute("UPDATE tickets SET status = 'closed', outcome = ? WHERE id = ?", (outcome, ticket_id))
        return f"ticket {ticket_id} closed ({outcome})"


TOOL_NAMES = ["get_ticket", "get_order", "get_customer", "read_policy", "cancel_order", "refund_order",
              "update_address", "close_ticket"]


def gold_plan(db: sqlite3.Connection, t: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The oracle's tool calls for task `t` on the seeded (unmodified) database `db`."""
    order = Shop(db).get_order(t["order"])
    kind = t["kind"]
    if kind == "cancellation":
        allowed, act = order["status"] == "pending", ("cancel_order", {"order_id": t["order"]})
    elif kind == "refund":
        allowed = (order["status"] == "delivered" and not order["refunded"]
                   and order["days_since_delivery"] <= t["refund_window_days"])
        act = ("refund_order", {"order_id": t["order"]})
    else:
        allowed = order["status"] == "pending"
        act = ("update_address", {"order_id": t["order"], "address": t["new_address"]})
    plan = [("get_ticket", {"ticket_id": t["ticket"]}), ("get_order", {"order_id": t["order"]}),
            ("read_policy", {"name": kind})]
    if allowed:
        plan.append(act)
    plan.append(("close_ticket", {"ticket_id": t["ticket"], "outcome": "resolved" if allowed else "denied"}))
    return plan


def dump(db: sqlite3.Connection) -> dict[str, dict[str, tuple]]:
    return {name: {row[0]: tuple(row) for row in db.execute(f"SELECT * FROM {name} ORDER BY 1")}
            for name in TABLES}


class WorkflowEnv(ChatEnv):
    def __init__(self, max_turns: int | None = None, render_mode: str | None = None):
        super().__init__(max_turns=max_turns, render_mode=render_mode)
        self.db: sqlite3.Connection | None = None
        self.shop: Shop | None = None
        self._tools_cache: dict[str, Tool] = {}

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if "task_id" in options:
            try:
                prefix, n_s = str(options["task_id"]).split("/")
                n = int(n_s)
                assert prefix == "workflow"
            except (ValueError, AssertionError):
                raise ValueError(f"bad workflow task_id {options['task_id']!r}; expected 'workflow/<n>'") from None
        else:
            n = int(rng.integers(1 << 31))
        if self.db is not None:
            self.db.close()
        self.db, t = build_database(n)
        self.shop = Shop(self.db)
        plan = gold_plan(self.db, t)
        return Task(task_id=f"workflow/{n}", prompt=f"Resolve support ticket {t['ticket']}.", system=SYSTEM,
                    data={"seed": n, "plan": plan, **t}, resources=Resources(step_timeout_s=10.0, max_turns=12))

    def _toolbox(self, task: Task) -> Toolbox:
        assert self.shop is not None
        # Bound methods change per episode; the pydantic models do not, so reuse those.
        if not self._tools_cache:
            self._tools_cache = {name: make_tool(getattr(self.shop, name)) for name in TOOL_NAMES}
        return Toolbox(self._tools_cache[name].bind(getattr(self.shop, name)) for name in TOOL_NAMES)

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        assert self.task is not None and self.db is not None
        gold_db, _ = build_database(self.task.data["seed"])
        gold = Shop(gold_db)
        for name, args in self.task.data["plan"]:
            getattr(gold, name)(**args)
        want, got = dump(gold_db), dump(self.db)
        gold_db.close()
        diff = [f"{table}/{key}: expected {want[table].get(key)} got {got[table].get(key)}"
                for table in TABLES for key in sorted(set(want[table]) | set(got[table]))
                if want[table].get(key) != got[table].get(key)]
        return float(not diff), {"state_matches": not diff, "diff": diff[:10], "n_diff": len(diff)}

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        assert self.task is not None
        plan = self.task.data["plan"]
        step = count_assistant_turns(messages)
        if step < len(plan):
            return assistant(None, plan[step])
        outcome = plan[-1][1]["outcome"]
        return assistant(f"Ticket {self.task.data['ticket']} is closed: {outcome}.")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
