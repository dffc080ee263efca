//! The runner's Lua scripts, each in its own file under `shared/lua/`
//! (which documents its KEYS and ARGV), loaded one way: `include_str!` into
//! a [`redis::Script`] made once. `shared/tests/scripts.rs` tests each.

use std::sync::LazyLock;

macro_rules! lua {
    ($name:ident, $file:literal, $doc:literal) => {
        #[doc = $doc]
        pub static $name: LazyLock<redis::Script> =
            LazyLock::new(|| redis::Script::new(include_str!(concat!("../lua/", $file))));
    };
}

lua!(
    ACK,
    "ack.lua",
    "A batch's acknowledgements with their writes, fenced by the partition's owner."
);
lua!(
    LEASE,
    "lease.lua",
    "Renews or releases a lease still held by its holder."
);
lua!(
    MEMBERS,
    "members.lua",
    "Announces a consumer in its stage and lists the live ones."
);
lua!(
    RETIRE,
    "retire.lua",
    "Removes a consumer from a group if nothing is pending for it."
);
