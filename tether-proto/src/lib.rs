//! Sans-IO core of the tether stable-conduit protocol.
#![forbid(unsafe_code)]
