"""Names of the environment variables through which toolkit's processes hand things to each other.

The one module that `toolkit.utils` (in the user's kernel) shares with the server.
"""

from __future__ import annotations

# `toolkit.utils.launch_server_cmd` binds the listening socket itself and passes its descriptor
# number here, so the port cannot be taken by someone else before the server starts. A server
# serves on that socket, marks it non-inheritable and drops the variable for its own children.
LISTEN_FD_ENV = "TOOLKIT_LISTEN_FD"

# The descriptor of a front-end process's end of its link to the engine process.
ENGINE_SOCKET_ENV = "TOOLKIT_ENGINE_SOCKET"

# `launch_server_cmd` names its own process here ("PID:START_TIME"): the server stops once that
# process is gone, so a crashed or killed notebook kernel leaves no server behind.
PARENT_ENV = "TOOLKIT_PARENT"

# An engine process of `--dp-size N`: its end of the control socket over which the supervisor
# sends it the front ends' links, and its number.
CONTROL_SOCKET_ENV = "TOOLKIT_CONTROL_SOCKET"
ENGINE_INDEX_ENV = "TOOLKIT_ENGINE_INDEX"
