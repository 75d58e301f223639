"""Who calls the API: a Unix account the kernel (SO_PEERCRED) or munge vouched for, never a name the
caller chose; and whether the service's own config names them, or one of their groups, an admin.

``admins`` entries are user names (``alice``) or Unix groups written ``@group`` (``@hpcadmin``); a group
counts whether it is the caller's primary or a supplementary one. Nobody is an admin by being root or the
service account: name them if they should be.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass

GROUP_PREFIX = "@"


@dataclass(frozen=True, slots=True)
class Caller:
    """A vouched-for Unix account: its uid, user name and the names of all its groups."""

    uid: int
    user: str
    groups: frozenset[str]


def caller_for_uid(uid: int) -> Caller:
    """The account of ``uid`` with its primary and supplementary groups (``os.getgrouplist``). A uid with
    no passwd entry keeps its number as its name and has no groups; a gid with no group entry, its number."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Caller(uid, str(uid), frozenset())
    gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return Caller(uid, entry.pw_name, frozenset(_group_name(gid) for gid in gids))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def is_admin(caller: Caller, admins: Sequence[str]) -> bool:
    """Whether ``admins`` (user names, or Unix groups written ``@group``) names the caller."""
    for entry in admins:
        if entry.startswith(GROUP_PREFIX):
            if entry[len(GROUP_PREFIX) :] in caller.groups:
                return True
        elif entry == caller.user:
            return True
    return False
