//! The Holdfast wire protocol: ids, validated names, error codes, messages, the frame
//! codec, the cell file, the duplex RPC connection and the accept loop every server runs,
//! with what bounds a peer there (connection caps, timeouts, frame memory).
//! Invariant: `proto` depends on no server crate, and an encoding it defines changes only
//! by appending an enum variant, never by reordering or removing one.

pub mod access;
pub mod activity;
pub mod admission;
pub mod budget;
pub mod buffer_pool;
pub mod bulk;
pub mod bulk_messages;
pub mod cell;
pub mod error;
pub mod flood;
pub mod frame;
pub mod frame_reader;
pub mod histogram;
pub mod identity;
pub mod ids;
pub mod lock;
pub mod message;
pub mod name;
pub mod resources;
pub mod rpc;
pub mod server;
pub mod time;
pub mod tls;
pub mod vldb_client;
pub mod warnings;

pub use bulk::Bulk;
pub use bulk_messages::Fetched;
pub use cell::{CellConfig, CellError};
pub use error::{ErrorCode, ProtoError};
pub use identity::{
    AccessList, AclEntry, Identity, PrincipalId, Rights, SealedToken, TokenBody, TokenError,
    TokenKey, TokenVerifier,
};
pub use ids::*;
pub use lock::{ByteRange, EmptyRange, LockKind};
pub use message::*;
pub use name::{PairName, VolumeName, check_entry_name};
pub use tls::{PeerClass, Transport};
pub use vldb_client::VldbClient;
