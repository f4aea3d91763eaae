"""tag-account: a transform module written in Python (built with componentize-py).

Annotates each event with the team that owns its account (`xteam`) and the acting principal's
short name (`xactor`, the last segment of `userIdentity.arn`).

Config:
  teams         comma-separated ACCOUNT=TEAM pairs (required)
  default_team  the team of accounts not listed (optional; without it they get no `xteam`)
"""

import json

import wit_world
from wit_world import Event, Member, Outcome_Annotate, Outcome_Failed, Outcome_Keep
from wit_world.imports import host
from componentize_py_types import Err

TEAMS = {}
DEFAULT_TEAM = None


class WitWorld(wit_world.WitWorld):
    def init(self, config):
        global TEAMS, DEFAULT_TEAM
        conf = dict(config)
        unknown = set(conf) - {"teams", "default_team"}
        if unknown:
            raise Err(f"unknown config key(s): {', '.join(sorted(unknown))}")
        teams = {}
        for pair in filter(None, (p.strip() for p in conf.get("teams", "").split(","))):
            account, sep, team = pair.partition("=")
            if not sep or not account.isdigit() or len(account) != 12 or not team:
                raise Err(f"teams: {pair!r} is not ACCOUNT=TEAM with a 12-digit account")
            teams[account] = team
        if not teams:
            raise Err("teams: list ACCOUNT=TEAM pairs, e.g. teams = \"111122223333=payments\"")
        TEAMS = teams
        DEFAULT_TEAM = conf.get("default_team")

    def process(self, events):
        return [self.one(e) for e in events]

    def one(self, event: Event):
        members = []
        team = TEAMS.get(event.fields.account or "", DEFAULT_TEAM)
        if team is not None:
            members.append(Member("xteam", json.dumps(team)))
        else:
            host.count("untagged", 1)
        try:
            doc = json.loads(event.json)
        except ValueError as e:
            return Outcome_Failed(f"event is not JSON: {e}")
        arn = (doc.get("userIdentity") or {}).get("arn")
        if isinstance(arn, str) and arn:
            members.append(Member("xactor", json.dumps(arn.rsplit("/", 1)[-1])))
        return Outcome_Annotate(members) if members else Outcome_Keep()
