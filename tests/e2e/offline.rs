//! Cached files stay readable while their servers are unreachable (killed, or a fenced pair).
