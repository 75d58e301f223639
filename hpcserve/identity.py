"""Who is calling: the Unix account of the process's effective uid.

Not ``getpass.getuser()``: that reads $LOGNAME and $USER first, so anyone could claim to be the owner of
someone else's deployment by setting an environment variable.
"""

from __future__ import annotations

import os
import pwd


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no passwd entry (some containers): the number is still unambiguous
        return str(os.geteuid())
