"""The rules, pure: who an identity is, which principals it matches, what it may do.

Principals (configuration): `anonymous` (anyone, with or without credentials),
`authenticated` (any login), `user:NAME` (an htpasswd user, a robot, or an OIDC user
under its prefix) and `group:NAME`. An empty list is nobody.

Pull rules are tried in order and the first whose `names` match the canonical name
decides; a name no rule matches is refused to everyone (fail closed). Name globs: `*`
matches within one path component, `**` across components (`env/**`, `**`), `?` one
character of a component.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from condery.config.schema import ChannelRule, PullRule

ANONYMOUS_KIND = "anonymous"


@dataclass(frozen=True)
class Identity:
    """Who a request comes from. `name` is empty for anonymous."""

    name: str = ""
    kind: str = ANONYMOUS_KIND  # anonymous, user (htpasswd), robot, oidc
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def authenticated(self) -> bool:
        return self.kind != ANONYMOUS_KIND

    def __repr__(self) -> str:  # what a log line or a test failure may show
        return f"Identity({self.kind}:{self.name or '-'})"


ANONYMOUS = Identity()


def matches(identity: Identity, principals: Iterable[str]) -> bool:
    """Whether `identity` is one of `principals`."""
    for principal in principals:
        if principal == "anonymous":
            return True
        if principal == "authenticated":
            if identity.authenticated:
                return True
        elif principal.startswith("user:"):
            if identity.authenticated and principal[5:] == identity.name:
                return True
        elif principal.startswith("group:"):
            if identity.authenticated and principal[6:] in identity.groups:
                return True
    return False


@functools.lru_cache(maxsize=1024)
def glob_pattern(glob: str) -> re.Pattern[str]:
    """A name glob as a regular expression: `**` any characters, `*` any but `/`, `?` one but `/`."""
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):  # `a/**/b` also matches `a/b`
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def name_matches(name: str, globs: Iterable[str]) -> bool:
    return any(glob_pattern(glob).fullmatch(name) for glob in globs)


class Policy:
    """The configured rules, asked about one identity at a time."""

    def __init__(self, rules: Sequence[PullRule], endpoints: Mapping[str, Sequence[str]],
                 channels: Sequence[ChannelRule] = ()) -> None:
        self.rules = tuple(rules)
        self.endpoints = dict(endpoints)
        self.channels = tuple(channels)

    def pull_rule(self, name: str) -> PullRule | None:
        """The first rule whose names match the canonical `name`, if any."""
        for rule in self.rules:
            if name_matches(name, rule.names):
                return rule
        return None

    def may_pull(self, identity: Identity, name: str) -> bool:
        rule = self.pull_rule(name)
        return rule is not None and matches(identity, rule.pull)

    def may_use(self, identity: Identity, endpoint: str) -> bool:
        """The write and admin endpoints (configuration: auth.endpoints); unknown ones: nobody."""
        return matches(identity, self.endpoints.get(endpoint, ()))

    def may_read_channel(self, identity: Identity, channel: str) -> bool:
        """Whether packages of `channel` (as configured) may reach this identity's images.

        The first channel rule naming the channel decides; a channel no rule names is
        everyone's (the configured channels are public unless a rule says otherwise).
        """
        for rule in self.channels:
            if rule.channel == channel:
                return matches(identity, rule.read)
        return True

    def readable_channels(self, identity: Identity, channels: Sequence[str]) -> tuple[str, ...]:
        """The configured `channels` this identity may read, in their order: what its solves may use."""
        return tuple(channel for channel in channels if self.may_read_channel(identity, channel))
