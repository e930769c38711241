//! Frames: the [`Frame`] enum, [`FrameType`] and the stream-level [`FrameDecoder`].
//!
//! Every stream carries a sequence of frames, each `type: u8` · `length: u32 BE` · `body`.
//! Bodies are CBOR maps (control frames) except [`Records`] and [`Produce`], which use a fixed
//! binary layout (see [`data`] and [`publish`]).

use bytes::{Buf, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::cbor;
use crate::codec::{Codec, DecodeLimits, FrameError, HEADER_LEN, Reader};

pub mod data;
pub mod hub;
pub mod publish;
pub mod session;
pub mod subscription;

pub use data::{PartitionOpen, Record, RecordIter, RecordRef, Records};
pub use hub::{Action, Endpoint, GroupHint, Hello, Profile, Refused, Ticket, Want};
pub use publish::{
    NewRecord, NewRecordIter, NewRecordRef, PRODUCER_TOKEN_LEN, Produce, ProduceAck, ProduceError,
    PublishAccepted, PublishOpen,
};
pub use session::{Attach, AttachProof, Attached, EarlyAttach, GoAway, SessionLimits};
pub use subscription::{
    AssignedPartition, Assignment, Fetch, Flip, FlipHint, Forecast, Grant, Mode, PartitionForecast,
    Position, Start, SubError, Subscribe,
};

/// A body type with a fixed frame type.
pub trait FrameBody: Codec {
    /// The frame type that carries this body.
    const TYPE: FrameType;
}

macro_rules! frames {
    ($( $(#[$doc:meta])* $name:ident = $val:literal, control = $ctl:literal; )*) => {
        /// The frame type byte.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum FrameType {
            $( $(#[$doc])* $name, )*
        }

        impl FrameType {
            /// Every frame type, in wire-value order.
            pub const ALL: &'static [FrameType] = &[ $( FrameType::$name, )* ];

            /// Maps a type byte; `None` for undefined types.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $( $val => Some(Self::$name), )*
                    _ => None,
                }
            }

            /// The type byte.
            pub fn to_u8(self) -> u8 {
                match self {
                    $( Self::$name => $val, )*
                }
            }

            /// True for CBOR-bodied frames (bounded by `max_control_body`); false for the two
            /// binary batch frames (bounded by [`DecodeLimits::max_batch_body`]).
            pub fn is_control(self) -> bool {
                match self {
                    $( Self::$name => $ctl, )*
                }
            }
        }

        /// Any Sibyl frame.
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        #[allow(clippy::large_enum_variant)]
        pub enum Frame {
            $( $(#[$doc])* $name($name), )*
        }

        impl Frame {
            /// This frame's type.
            pub fn frame_type(&self) -> FrameType {
                match self {
                    $( Self::$name(_) => FrameType::$name, )*
                }
            }

            fn encode_body(&self, out: &mut Vec<u8>) {
                match self {
                    $( Self::$name(b) => b.encode(out), )*
                }
            }

            fn decode_body(ty: FrameType, body: &[u8], limits: &DecodeLimits) -> Result<Self, FrameError> {
                match ty {
                    $( FrameType::$name => {
                        let mut r = Reader::new(body);
                        $name::decode_limited(&mut r, limits).map(Self::$name)
                    } )*
                }
            }
        }

        $(
            impl FrameBody for $name {
                const TYPE: FrameType = FrameType::$name;
            }
            impl From<$name> for Frame {
                fn from(b: $name) -> Self {
                    Self::$name(b)
                }
            }
        )*
    };
}

frames! {
    /// `0x01` client→hub, hub stream: authenticate and ask for a ticket.
    Hello = 0x01, control = true;
    /// `0x02` hub→client, hub stream: the shard ticket.
    Ticket = 0x02, control = true;
    /// `0x03` hub→client, hub stream: no ticket.
    Refused = 0x03, control = true;
    /// `0x04` hub→client, the hub's first uni stream (0.5-RTT): the likely shard group.
    GroupHint = 0x04, control = true;
    /// `0x10` client→hub, publish stream: open a publisher on a stream.
    PublishOpen = 0x10, control = true;
    /// `0x11` hub→client, publish stream: the publisher is open.
    PublishAccepted = 0x11, control = true;
    /// `0x12` client→hub, publish stream: a batch of new records (binary body).
    Produce = 0x12, control = false;
    /// `0x13` hub→client, publish stream: a batch was appended.
    ProduceAck = 0x13, control = true;
    /// `0x14` hub→client, publish stream: a batch was rejected.
    ProduceError = 0x14, control = true;
    /// `0x20` client→shard, session stream: present the token and proof.
    Attach = 0x20, control = true;
    /// `0x21` shard→client, session stream: the session is attached.
    Attached = 0x21, control = true;
    /// `0x22` shard→client, session stream: drain, reconnect elsewhere.
    GoAway = 0x22, control = true;
    /// `0x23` client→shard, session stream (0-RTT): the token, proof to follow.
    EarlyAttach = 0x23, control = true;
    /// `0x24` client→shard, session stream: the proof of an `EarlyAttach`.
    AttachProof = 0x24, control = true;
    /// `0x30` client→shard, control stream: start a subscription.
    Subscribe = 0x30, control = true;
    /// `0x31` shard→client, control stream: the partitions assigned to this subscription.
    Assignment = 0x31, control = true;
    /// `0x32` shard→client, control stream: a token-bucket grant lease.
    Grant = 0x32, control = true;
    /// `0x33` shard→client, control stream: the subscription failed.
    SubError = 0x33, control = true;
    /// `0x34` client→shard, control stream: what the app has consumed.
    Position = 0x34, control = true;
    /// `0x35` client→shard, control stream: pull records (reactive mode).
    Fetch = 0x35, control = true;
    /// `0x36` client→shard, control stream: predicted consumption.
    Forecast = 0x36, control = true;
    /// `0x37` shard→client, control stream: a flip is likely (reserved for flip events).
    FlipHint = 0x37, control = true;
    /// `0x38` shard→client, control stream: the subscription flips streams (reserved).
    Flip = 0x38, control = true;
    /// `0x40` shard→client, first frame of a partition uni stream.
    PartitionOpen = 0x40, control = true;
    /// `0x41` shard→client, partition uni stream: a batch of records (binary body).
    Records = 0x41, control = false;
}

impl FrameType {
    /// Maximum body length of this type under `limits`.
    pub fn max_body(self, limits: &DecodeLimits) -> u32 {
        if self.is_control() {
            limits.max_control_body
        } else {
            limits.max_batch_body()
        }
    }
}

/// What a receiver accepts on each kind of stream (PROTOCOL.md §4), for
/// [`FrameDecoder::accepting`].
pub mod inbound {
    use super::FrameType;

    /// Hub, on the hub stream: `Hello` only.
    pub const HUB_STREAM: &[FrameType] = &[FrameType::Hello];
    /// Hub, on a publish stream: `PublishOpen`, then `Produce`.
    pub const PUBLISH_STREAM: &[FrameType] = &[FrameType::PublishOpen, FrameType::Produce];
    /// Hub, on a bidi stream opened after the ticket (a publish stream is the only kind).
    pub const AFTER_TICKET: &[FrameType] = PUBLISH_STREAM;
    /// Shard, on the session stream: `Attach`, or `EarlyAttach` then `AttachProof`.
    pub const SESSION_STREAM: &[FrameType] = &[
        FrameType::Attach,
        FrameType::EarlyAttach,
        FrameType::AttachProof,
    ];
    /// Shard, on a control stream: `Subscribe`, then `Position`, `Fetch`, `Forecast`.
    pub const CONTROL_STREAM: &[FrameType] = &[
        FrameType::Subscribe,
        FrameType::Position,
        FrameType::Fetch,
        FrameType::Forecast,
    ];
}

/// Body decode with limits: batch frames check record counts and payload totals; CBOR bodies
/// only need the frame-length check already done by the caller.
pub(crate) trait DecodeLimited: Sized {
    fn decode_limited(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<Self, FrameError>;
}

impl Frame {
    /// Decodes one whole frame (header and body) from `r` under `limits`.
    ///
    /// On [`FrameError::Incomplete`] nothing is consumed. Type and length are checked as soon
    /// as they are available, before waiting for (or allocating) the body.
    pub fn decode_with_limits(
        r: &mut Reader<'_>,
        limits: &DecodeLimits,
    ) -> Result<Self, FrameError> {
        let (ty, len) = peek_header(r.peek_rest(), limits)?;
        let total = HEADER_LEN + len as usize;
        if r.remaining() < total {
            return Err(FrameError::Incomplete {
                needed: total - r.remaining(),
            });
        }
        r.take(HEADER_LEN)?;
        let body = r.take(len as usize)?;
        Self::decode_body(ty, body, limits)
    }

    /// Encodes this frame (header and body) into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Checks the header at the start of `buf`: returns the type and body length, `Incomplete`
/// when fewer than 5 bytes are there, or the invalid variant.
fn peek_header(buf: &[u8], limits: &DecodeLimits) -> Result<(FrameType, u32), FrameError> {
    peek_header_on(buf, limits, None)
}

/// [`peek_header`] on a stream that accepts only `allowed` (all types when `None`): a defined
/// type outside the set is refused from its first byte, before its length is read.
fn peek_header_on(
    buf: &[u8],
    limits: &DecodeLimits,
    allowed: Option<&[FrameType]>,
) -> Result<(FrameType, u32), FrameError> {
    let Some(&tb) = buf.first() else {
        return Err(FrameError::Incomplete { needed: HEADER_LEN });
    };
    let ty = FrameType::from_u8(tb).ok_or(FrameError::UnknownType(tb))?;
    if allowed.is_some_and(|a| !a.contains(&ty)) {
        return Err(FrameError::NotAllowed { ty: tb });
    }
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let max = ty.max_body(limits);
    if len > max {
        return Err(FrameError::TooLarge { ty: tb, len, max });
    }
    Ok((ty, len))
}

impl Codec for Frame {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.frame_type().to_u8());
        out.extend_from_slice(&[0; 4]);
        self.encode_body(out);
        let len = out.len() - start - HEADER_LEN;
        // Bodies are far below 4 GiB: batch builders bound their size by u32 arithmetic and
        // CBOR control bodies are small. Saturate rather than panic if a caller overfills.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Self::decode_with_limits(r, &DecodeLimits::default())
    }
}

/// Buffers the bytes of one stream and yields whole frames.
///
/// Call [`push`](Self::push) with each chunk read from the stream (or read straight into
/// [`read_buffer`](Self::read_buffer)), then
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`; at the stream's end call
/// [`finish`](Self::finish). Any `Err` is fatal for the stream: close with
/// [`FrameError::code`]. The buffer never grows past one frame's maximum plus one chunk as
/// long as frames are drained after each push.
///
/// Each received byte is copied once, into the buffer; a `Records` frame's record section is
/// then handed out as a slice of that buffer ([`Records::decode_shared`]), so a batch costs
/// one copy from the transport's chunks and no more. Once a `Records` header is buffered, room
/// for the whole frame (bounded by `max_batch_body`, checked first) is reserved, so a large
/// batch is not moved while it arrives. Other frames grow the buffer as their bytes arrive (a
/// peer cannot make a hub or shard reserve a frame's worth of memory with a 5-byte header;
/// `Records` only flow shard → client).
///
/// A decoder made with [`accepting`](Self::accepting) refuses every other frame type from
/// its type byte ([`FrameError::NotAllowed`], `PROTOCOL_VIOLATION`), before the length is
/// read or any body buffered: a server never buffers a body its stream cannot carry.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    limits: DecodeLimits,
    allowed: Option<&'static [FrameType]>,
}

impl FrameDecoder {
    /// A decoder with the given limits, accepting every frame type.
    pub fn new(limits: DecodeLimits) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            allowed: None,
        }
    }

    /// A decoder with the given limits for a stream that carries only `allowed` (one of the
    /// [`inbound`] sets).
    pub fn accepting(limits: DecodeLimits, allowed: &'static [FrameType]) -> Self {
        Self {
            buf: BytesMut::new(),
            limits,
            allowed: Some(allowed),
        }
    }

    fn header(&self, buf: &[u8]) -> Result<(FrameType, u32), FrameError> {
        peek_header_on(buf, &self.limits, self.allowed)
    }

    /// The limits in force.
    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Appends bytes received on the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        let have = self.buf.len();
        if have < HEADER_LEN && have + bytes.len() >= HEADER_LEN {
            // This chunk completes a `Records` header: room for the whole frame at once (its
            // length was checked against the type's limit by `peek_header`).
            let mut h = [0u8; HEADER_LEN];
            h[..have].copy_from_slice(&self.buf);
            h[have..].copy_from_slice(&bytes[..HEADER_LEN - have]);
            if let Ok((FrameType::Records, len)) = self.header(&h) {
                let want = (HEADER_LEN + len as usize).max(have + bytes.len());
                self.buf.reserve(want - have);
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to read the stream's next bytes into, for a transport that copies into
    /// spare capacity (one copy, no intermediate chunk). While a `Records` frame whose header
    /// is buffered is incomplete, it has room for exactly the rest of that frame (bounded by
    /// `max_batch_body`, as with [`push`](Self::push)), so the frame is never moved while it
    /// arrives; otherwise at least `min` bytes of spare capacity. Only append to it
    /// (`BufMut`, `read_buf`); then call [`next_frame`](Self::next_frame) as after a push.
    pub fn read_buffer(&mut self, min: usize) -> &mut BytesMut {
        let want = match self.header(&self.buf) {
            Ok((FrameType::Records, len)) if HEADER_LEN + len as usize > self.buf.len() => {
                HEADER_LEN + len as usize - self.buf.len()
            }
            _ => min,
        };
        self.buf.reserve(want);
        &mut self.buf
    }

    /// After a frame was taken: room for the whole next `Records` frame if its header is
    /// buffered.
    fn reserve_next(&mut self) {
        if let Ok((FrameType::Records, len)) = self.header(&self.buf) {
            let total = HEADER_LEN + len as usize;
            if total > self.buf.len() {
                self.buf.reserve(total - self.buf.len());
            }
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the fatal error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let (ty, len) = match self.header(&self.buf) {
            Ok(h) => h,
            Err(FrameError::Incomplete { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        if ty == FrameType::Records {
            // The batch keeps a slice of this frame's bytes (no copy); the rest of the
            // buffer moves on.
            let frame = self.buf.split_to(total).freeze();
            let records = Records::decode_shared(&frame.slice(HEADER_LEN..), &self.limits)?;
            self.reserve_next();
            return Ok(Some(Frame::Records(records)));
        }
        let mut r = Reader::new(&self.buf[..total]);
        let f = Frame::decode_with_limits(&mut r, &self.limits)?;
        self.buf.advance(total);
        self.reserve_next();
        Ok(Some(f))
    }

    /// Declares the end of the stream: an error if a partial frame is buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        let rest = &self.buf[..];
        if rest.is_empty() {
            return Ok(());
        }
        self.header(rest)?;
        match Frame::decode_with_limits(&mut Reader::new(rest), &self.limits) {
            Err(e) => Err(e),
            // A whole frame is still buffered: the caller did not drain; report it as
            // incomplete-at-end so nothing is silently dropped.
            Ok(_) => Err(FrameError::Incomplete { needed: 0 }),
        }
    }
}

/// Shared CBOR body codec for control frames.
pub(crate) fn encode_cbor<T: Serialize>(v: &T, out: &mut Vec<u8>) {
    // Invariant: our frame bodies are plain structs of integers, strings, byte strings,
    // sequences and maps with integer or string keys; serde_cbor cannot fail on them when
    // writing into a Vec.
    cbor::to_writer(v, out).expect("control frame bodies always serialize");
}

pub(crate) fn decode_cbor<T: DeserializeOwned>(
    ty: FrameType,
    r: &mut Reader<'_>,
) -> Result<T, FrameError> {
    cbor::from_slice(r.take_rest()).map_err(|e| FrameError::from_cbor(ty.to_u8(), e))
}

/// Implements [`Codec`] and limited decode for a CBOR-bodied frame.
macro_rules! cbor_frame {
    ($($t:ident),* $(,)?) => {
        $(
            impl $crate::codec::Codec for $t {
                fn encode(&self, out: &mut Vec<u8>) {
                    $crate::frame::encode_cbor(self, out)
                }
                fn decode(r: &mut $crate::codec::Reader<'_>) -> Result<Self, $crate::codec::FrameError> {
                    let v: Self = $crate::frame::decode_cbor(<Self as $crate::frame::FrameBody>::TYPE, r)?;
                    v.validate().map_err(|d| $crate::codec::FrameError::malformed(<Self as $crate::frame::FrameBody>::TYPE.to_u8(), d))?;
                    Ok(v)
                }
            }
            impl $crate::frame::DecodeLimited for $t {
                fn decode_limited(r: &mut $crate::codec::Reader<'_>, _limits: &$crate::codec::DecodeLimits) -> Result<Self, $crate::codec::FrameError> {
                    <Self as $crate::codec::Codec>::decode(r)
                }
            }
        )*
    };
}
pub(crate) use cbor_frame;

/// Frame bodies' semantic checks beyond their CBOR shape (default: none).
pub(crate) trait Validate {
    fn validate(&self) -> Result<(), &'static str> {
        Ok(())
    }
}

/// Decoding rules of PROTOCOL.md §3.2 that serde's derive does not give on its own (a
/// struct's duplicate field is already an error there; unknown keys are ignored).
pub(crate) mod rules {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

    /// An optional field that is not an `Option`: absent and `null` both give the default.
    pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// A CBOR map whose keys must be distinct: a duplicate key is malformed.
    pub(crate) fn unique_map<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + fmt::Debug,
        V: Deserialize<'de>,
    {
        struct Unique<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for Unique<K, V>
        where
            K: Deserialize<'de> + Ord + fmt::Debug,
            V: Deserialize<'de>,
        {
            type Value = BTreeMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map with distinct keys")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<K, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate map key {k:?}"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(out)
            }
        }

        d.deserialize_map(Unique(PhantomData))
    }
}
