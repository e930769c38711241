//! A deterministic simulation of clients, shards and the hub, after quinn-proto's
//! `tests/util.rs::Pair`: the real I/O-free machines — the SDK's [`ClientMachine`],
//! [`SubMachine`] and [`PublishMachine`], the shard's [`Flow`] with its [`PrefetchPlanner`],
//! the hub's [`GroupCoordinator`] and the store's idempotent append — exchange frames over an
//! in-memory network in virtual time. No sockets, no threads, no clock.
//!
//! ```text
//!  Consumer (ClientMachine + SubMachine + app queue) ─┐          ┌─ Shard (Flow + pumps per sub)
//!  Producer (PublishMachine)                          ├── Net ───┤
//!  Hub (tickets, publish path → Store, groups)        ┘          └─ link: GroupCoordinator msgs
//! ```
//!
//! - **Net**: every message is a `sibyl-proto` [`Frame`] encoded and decoded through the codec
//!   (the hub↔shard store link carries plain values). Each gets a random latency; a message
//!   may "lose a packet" and arrive a retransmission later. A stream never reorders (QUIC
//!   streams are ordered), different streams do. Killing a connection drops everything in
//!   flight on it and tells both ends (each after its own delay).
//! - **Time**: a virtual `Instant`; each step jumps to the earliest deadline of any machine,
//!   pump, app, fault or message, and handles everything due. `MAX_STEPS` bounds a livelock.
//! - **Log**: the real [`Store`] in a temporary directory (`Durability::Never`): offsets,
//!   reads, and the producer dedup table of `append_idempotent`.
//! - **Randomness**: one `StdRng` seeded from the `u64` seed drives latencies, losses, fault
//!   times, app pace, publish pace and the client's backoff.
//!
//! Invariants are asserted as they happen (each app delivery is the next offset of its
//! partition and equals the log's record; in-flight bytes within the client's buffer) and at
//! the end (everything in the log delivered, acked records once at their acked offsets). A
//! failing seed prints its one-line reproduction (see [`run_seeds`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sibyl_gateway::hub::{GroupCoordinator, GroupPush, LinkId, LinkMember, PositionReport};
use sibyl_gateway::predict::{MemberId, PartitionLoad, PrefetchConfig, PrefetchPlanner, SubKey};
use sibyl_gateway::session::flow::{
    Admit, Batch, Flow, FlowConfig, GroupRelay, PumpEvent, PumpStep, StartAt,
    Transmit as FlowTransmit,
};
use sibyl_gateway::store::{
    BatchOutcome, Durability, NewRecord as StoreRecord, PRODUCER_WINDOW, ProducerBatch, Store,
    StoreConfig, StreamConfig,
};
use sibyl_proto::client::{AttemptId, ClientAction, ClientConfig, ClientMachine};
use sibyl_proto::forecast::ForecastConfig;
use sibyl_proto::frame::{
    Attach, Attached, Endpoint, Grant, Mode, NewRecord, PRODUCER_TOKEN_LEN, PartitionOpen, Produce,
    ProduceAck, PublishAccepted, PublishOpen, RecordRef, Records, SessionLimits, Start, Subscribe,
    Ticket,
};
use sibyl_proto::subscription::{Deliver, MachineConfig, Open, Transmit as SubTransmit};
use sibyl_proto::{DecodeLimits, Frame, PublishConfig, PublishMachine, Reader, SubMachine};

/// The simulated stream.
pub(crate) const STREAM: &str = "sim";
/// Steps one run may take before it counts as a livelock.
pub(crate) const MAX_STEPS: u64 = 2_000_000;
/// The RTT the shard's flows plan with.
const RTT: Duration = Duration::from_millis(25);
/// Virtual wall clock at the start (ms since the Unix epoch).
const BASE_MS: u64 = 1_800_000_000_000;
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------------
// Seeds

/// Runs `scenario` for each seed: `SIM_SEED=<n>` runs that one; else `SIM_SEEDS` seeds
/// (default `default_seeds`) from `SIM_SEED_BASE` (default 0). A failing seed prints its
/// reproduction line and fails the test. Returns the reports.
pub(crate) fn run_seeds(
    scenario: &str,
    default_seeds: u64,
    run: impl Fn(u64) -> Report,
) -> Vec<Report> {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let base = env("SIM_SEED_BASE").unwrap_or(0);
            (base..base + env("SIM_SEEDS").unwrap_or(default_seeds)).collect()
        }
    };
    let mut reports = Vec::with_capacity(seeds.len());
    for &seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run(seed))) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!(
                    "simulation `{scenario}` failed at seed {seed}; reproduce with: \
                     SIM_SEED={seed} cargo test -p sibyl-gateway --test simulation {scenario}"
                );
                resume_unwind(e);
            }
        }
    }
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let max = |f: fn(&Report) -> u64| reports.iter().map(f).max().unwrap_or(0);
    println!(
        "{scenario}: {} seeds ok; delivered {} records, {} duplicates dropped by the SDK, \
         {} group duplicates after a member loss, {} crossing a hand-over, {} reconnects, {} re-sent batches, {} dedup hits, \
         {} messages, {} steps (max {}), longest starvation {} ms, peak in-flight {} B, \
         waits over the bound {}",
        reports.len(),
        sum(|r| r.delivered),
        sum(|r| r.sdk_duplicates),
        sum(|r| r.group_duplicates),
        sum(|r| r.crossing_duplicates),
        sum(|r| r.reconnects),
        sum(|r| r.resent),
        sum(|r| r.dedup_hits),
        sum(|r| r.messages),
        sum(|r| r.steps),
        max(|r| r.steps),
        max(|r| r.max_starved_ms),
        max(|r| r.peak_inflight),
        sum(|r| r.starved_over_bound),
    );
    reports
}

/// What one run saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    /// Records handed to apps.
    pub(crate) delivered: u64,
    /// Records the SDK's machine dropped as already delivered.
    pub(crate) sdk_duplicates: u64,
    /// Offsets delivered to two members of a group after a member loss (at-least-once).
    pub(crate) group_duplicates: u64,
    /// Offsets delivered to two members without a member loss, at or above a hand-over the
    /// hub completed (the crossing-`Position` race).
    pub(crate) crossing_duplicates: u64,
    /// Shard sessions re-established by consumers.
    pub(crate) reconnects: u64,
    /// Publish batches re-sent after a lost stream.
    pub(crate) resent: u64,
    /// Re-sent batches the store recognised (not appended again).
    pub(crate) dedup_hits: u64,
    /// Messages the network carried.
    pub(crate) messages: u64,
    /// Simulation steps.
    pub(crate) steps: u64,
    /// Longest time an app found its queue empty while the log held records for it (ms).
    pub(crate) max_starved_ms: u64,
    /// App waits longer than the scenario's starvation bound.
    pub(crate) starved_over_bound: u64,
    /// Largest bytes in flight of a predictive flow (shard side).
    pub(crate) peak_inflight: u64,
    /// Records in the log at the end.
    pub(crate) log_records: u64,
}

// ---------------------------------------------------------------------------------------------
// Setup

/// One consumer (an SDK client with one subscription).
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSpec {
    /// Push or pull.
    pub(crate) mode: Mode,
    /// Consumer group, if any.
    pub(crate) group: Option<String>,
    /// The app's pace, records/s.
    pub(crate) rate: f64,
    /// When it starts.
    pub(crate) join_at: Duration,
    /// Predictive mode: the buffer it advertises.
    pub(crate) buffer_bytes: u64,
}

impl ConsumerSpec {
    /// A consumer reading at `rate` from the start.
    pub(crate) fn new(mode: Mode, rate: f64) -> Self {
        Self {
            mode,
            group: None,
            rate,
            join_at: Duration::ZERO,
            buffer_bytes: 16 * 1024,
        }
    }
}

/// A scheduled fault or change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fault {
    /// Kill consumer `i`'s shard connection (both sides are told).
    KillConsumerConn(usize),
    /// Kill shard `s`: its connections and its store link.
    KillShard(usize),
    /// Kill the shard consumer `i` is attached to (if any).
    KillShardOf(usize),
    /// Kill the producer's hub connection.
    KillProducerConn,
    /// Set consumer `i`'s app pace (records/s).
    SetRate(usize, f64),
}

/// A scenario's world.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    /// Partitions of the stream.
    pub(crate) partitions: u32,
    /// Shards of the (one) shard group.
    pub(crate) shards: usize,
    /// Consumers.
    pub(crate) consumers: Vec<ConsumerSpec>,
    /// Records a background writer appends (plain appends), spread over `produce_for`.
    pub(crate) background_records: u64,
    /// Records an idempotent producer publishes, spread over `produce_for`.
    pub(crate) produced_records: u64,
    /// How long the writers write.
    pub(crate) produce_for: Duration,
    /// Faults and changes, at times after the start.
    pub(crate) faults: Vec<(Duration, Fault)>,
    /// Probability that a message loses a packet (arrives a retransmission timeout later).
    pub(crate) loss: f64,
    /// Starvation bound the report counts waits against.
    pub(crate) starve_bound: Duration,
    /// Grant and pump settings of every flow.
    pub(crate) flow: FlowConfig,
}

impl Setup {
    /// Defaults: 3 partitions, 2 shards, no consumers, 5 % loss.
    pub(crate) fn new() -> Self {
        Self {
            partitions: 3,
            shards: 2,
            consumers: Vec::new(),
            background_records: 0,
            produced_records: 0,
            produce_for: Duration::from_secs(2),
            faults: Vec::new(),
            loss: 0.05,
            starve_bound: Duration::from_secs(1),
            flow: FlowConfig {
                grant_rate: 100_000,
                grant_burst: 10_000,
                grant_lease: Duration::from_secs(30),
                batch_records: 16,
                batch_bytes: 2048,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum StreamId {
    Session,
    Control,
    Part(u32, u64),
    Publish,
    Link,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Party {
    Consumer(usize),
    Producer,
    Shard(usize),
    Hub,
}

#[derive(Debug)]
enum LinkMsg {
    Join {
        who: LinkMember,
        group: String,
        starts: Vec<(u32, u64)>,
    },
    Leave(LinkMember),
    Position {
        who: LinkMember,
        partition: u32,
        next_offset: u64,
        serving: bool,
    },
    Forecast(LinkMember, Vec<PartitionLoad>),
    Push(GroupPush),
}

#[derive(Debug)]
enum Payload {
    /// An encoded frame.
    Frame(Vec<u8>),
    /// The sender finished the stream.
    Fin,
    /// The connection is gone.
    Closed,
    /// Ask the hub for a ticket (the Hello exchange, abstracted).
    Hello,
    /// A store-link message.
    Link(LinkMsg),
}

#[derive(Debug)]
struct Msg {
    at: Instant,
    seq: u64,
    conn: u64,
    to_client: bool,
    stream: StreamId,
    payload: Payload,
}

#[derive(Debug)]
struct Conn {
    client: Party,
    server: Party,
    alive: bool,
}

struct Net {
    rng: StdRng,
    msgs: Vec<Msg>,
    seq: u64,
    last: HashMap<(u64, bool, StreamId), Instant>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    loss: f64,
    sent: u64,
}

impl Net {
    fn open(&mut self, client: Party, server: Party) -> u64 {
        self.next_conn += 1;
        self.conns.insert(
            self.next_conn,
            Conn {
                client,
                server,
                alive: true,
            },
        );
        self.next_conn
    }

    fn alive(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.alive)
    }

    fn latency(&mut self) -> Duration {
        let mut d = Duration::from_micros(self.rng.random_range(1_000..15_000));
        if self.rng.random_bool(self.loss) {
            // A lost packet: QUIC retransmits after about a PTO.
            d += Duration::from_micros(self.rng.random_range(30_000..80_000));
        }
        d
    }

    fn send(&mut self, now: Instant, conn: u64, to_client: bool, stream: StreamId, p: Payload) {
        if !self.alive(conn) {
            return;
        }
        let key = (conn, to_client, stream);
        let at = (now + self.latency()).max(self.last.get(&key).copied().unwrap_or(now));
        self.last.insert(key, at);
        self.push(at, conn, to_client, stream, p);
    }

    fn push(&mut self, at: Instant, conn: u64, to_client: bool, stream: StreamId, p: Payload) {
        self.seq += 1;
        self.sent += 1;
        self.msgs.push(Msg {
            at,
            seq: self.seq,
            conn,
            to_client,
            stream,
            payload: p,
        });
    }

    fn frame(&mut self, now: Instant, conn: u64, to_client: bool, stream: StreamId, f: Frame) {
        self.send(now, conn, to_client, stream, Payload::Frame(f.to_vec()));
    }

    /// Kills `conn`: what is in flight is lost, each end learns it after its own delay.
    fn kill(&mut self, now: Instant, conn: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.alive {
            return;
        }
        c.alive = false;
        self.msgs.retain(|m| m.conn != conn);
        for to_client in [true, false] {
            let at = now + self.latency();
            self.push(at, conn, to_client, StreamId::Session, Payload::Closed);
        }
    }

    fn next_at(&self) -> Option<Instant> {
        self.msgs.iter().map(|m| m.at).min()
    }

    /// The earliest message due at `now` (ties in send order).
    fn pop_due(&mut self, now: Instant) -> Option<Msg> {
        let i = self
            .msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| m.at <= now)
            .min_by_key(|(_, m)| (m.at, m.seq))
            .map(|(i, _)| i)?;
        Some(self.msgs.swap_remove(i))
    }
}

/// Decodes a frame through the codec; the whole encoding must be consumed.
fn decode(bytes: &[u8]) -> Frame {
    let mut r = Reader::new(bytes);
    let f = Frame::decode_with_limits(&mut r, &DecodeLimits::default())
        .expect("a frame the simulation encoded decodes");
    assert_eq!(r.remaining(), 0, "trailing bytes after a frame");
    f
}

// ---------------------------------------------------------------------------------------------
// Parties

#[derive(Debug)]
enum Reader_ {
    Current(u64, u32),
    Stale,
}

struct Consumer {
    spec: ConsumerSpec,
    cm: ClientMachine,
    sub: SubMachine,
    started: bool,
    attempts: BTreeMap<AttemptId, (u64, usize)>,
    conn: Option<u64>,
    readers: HashMap<(u64, StreamId), Reader_>,
    /// The app's queue: (push number, partition, record).
    queue: VecDeque<(u64, u32, sibyl_proto::frame::Record)>,
    pushes: u64,
    /// Per partition, the push number before which its queued records are of a revoked
    /// stream and must not reach the app.
    stale_before: BTreeMap<u32, u64>,
    queue_bytes: u64,
    rate: f64,
    next_take: Option<Instant>,
    waiting_since: Option<Instant>,
    /// Waiting while the log held records past the app's positions.
    starved_since: Option<Instant>,
    /// Per partition, the offsets this app received, in order.
    delivered: BTreeMap<u32, Vec<u64>>,
    attaches: u64,
}

enum PumpState {
    Ready,
    Wait(Option<Instant>),
    Tail(Instant),
    Held(Box<Records>, Batch, Instant),
}

struct Pump {
    epoch: u64,
    state: PumpState,
}

impl Pump {
    fn deadline(&self, now: Instant) -> Option<Instant> {
        match self.state {
            PumpState::Ready => Some(now),
            PumpState::Wait(t) => t,
            PumpState::Tail(t) | PumpState::Held(_, _, t) => Some(t),
        }
    }
}

struct ShardSub {
    flow: Flow,
    key: SubKey,
    sub_id: u32,
    member: Option<LinkMember>,
    pumps: BTreeMap<u32, Pump>,
    /// Predictive mode: the buffer of the client's latest `Forecast` (`None` before one).
    capacity: Option<u64>,
}

struct Shard {
    alive: bool,
    planner: PrefetchPlanner,
    link: u64,
    link_id: LinkId,
    /// Sessions by connection: `None` until `Attach`.
    sessions: BTreeMap<u64, Option<ShardSub>>,
}

struct Item {
    id: u64,
    rec: NewRecord,
}

struct Producer {
    pm: PublishMachine<Item>,
    conn: Option<u64>,
    accepted: bool,
    reconnect_at: Option<Instant>,
    next_push: Option<Instant>,
    pushed: u64,
    total: u64,
    acked: BTreeMap<u64, (u32, u64)>,
}

struct Hub {
    coord: GroupCoordinator,
    producers: u64,
    /// Producer id of each publish connection.
    publishers: HashMap<u64, u64>,
    dedup_hits: u64,
}

// ---------------------------------------------------------------------------------------------
// The simulation

/// One run: the world of a [`Setup`] under one seed.
pub(crate) struct Sim {
    setup: Setup,
    rng: StdRng,
    start: Instant,
    now: Instant,
    steps: u64,
    net: Net,
    store: Store,
    _dir: tempfile::TempDir,
    hub: Hub,
    shards: Vec<Shard>,
    consumers: Vec<Consumer>,
    producer: Option<Producer>,
    background_left: u64,
    next_background: Option<Instant>,
    faults: VecDeque<(Instant, Fault)>,
    next_key: u64,
    next_member: u64,
    member_lost: bool,
    /// The consumer behind each group member.
    members: HashMap<LinkMember, usize>,
    /// Hand-overs the hub completed on a final `Position`: (consumer, partition, offset).
    handovers: Vec<(usize, u32, u64)>,
    report: Report,
    trace: bool,
}

fn endpoint(s: usize) -> Endpoint {
    Endpoint {
        addr: format!("10.0.0.{s}:4433"),
        server_name: format!("shard{s}"),
    }
}

fn shard_of(e: &Endpoint) -> usize {
    e.addr
        .trim_start_matches("10.0.0.")
        .split(':')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("a simulated endpoint")
}

impl Sim {
    /// A world for `setup`, driven by `seed`.
    pub(crate) fn new(seed: u64, setup: Setup) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(StoreConfig::new(dir.path().join("store"))).expect("store");
        store
            .create_stream(
                STREAM,
                StreamConfig {
                    partitions: setup.partitions,
                    durability: Durability::Never,
                    ..StreamConfig::default()
                },
            )
            .expect("stream");
        let start = Instant::now();
        let mut net = Net {
            rng: StdRng::seed_from_u64(rng.random()),
            msgs: Vec::new(),
            seq: 0,
            last: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 0,
            loss: setup.loss,
            sent: 0,
        };
        let shards = (0..setup.shards)
            .map(|s| Shard {
                alive: true,
                planner: PrefetchPlanner::new(PrefetchConfig::default()),
                link: net.open(Party::Shard(s), Party::Hub),
                link_id: LinkId(s as u64 + 1),
                sessions: BTreeMap::new(),
            })
            .collect();
        let consumers = setup
            .consumers
            .iter()
            .map(|spec| {
                let mut cc = ClientConfig::default();
                cc.backoff_initial = 20 * MS;
                cc.backoff_max = 500 * MS;
                cc.attach_timeout = 300 * MS;
                let mc = MachineConfig {
                    mode: spec.mode,
                    position_interval: 20 * MS,
                    fetch_records: 40,
                    fetch_on_empty: false,
                    forecast: ForecastConfig::default(),
                    buffer_bytes: spec.buffer_bytes,
                };
                Consumer {
                    cm: ClientMachine::new(cc, rng.random()),
                    sub: SubMachine::new(mc, Start::Earliest),
                    started: false,
                    attempts: BTreeMap::new(),
                    conn: None,
                    readers: HashMap::new(),
                    queue: VecDeque::new(),
                    queue_bytes: 0,
                    rate: spec.rate,
                    next_take: None,
                    waiting_since: None,
                    starved_since: None,
                    delivered: BTreeMap::new(),
                    attaches: 0,
                    pushes: 0,
                    stale_before: BTreeMap::new(),
                    spec: spec.clone(),
                }
            })
            .collect();
        let producer = (setup.produced_records > 0).then(|| Producer {
            pm: PublishMachine::new(PublishConfig {
                linger: 5 * MS,
                max_body: 1024,
                max_records: 8,
                idempotent: true,
            }),
            conn: None,
            accepted: false,
            reconnect_at: Some(start),
            next_push: Some(start),
            pushed: 0,
            total: setup.produced_records,
            acked: BTreeMap::new(),
        });
        let faults = setup
            .faults
            .iter()
            .map(|(d, f)| (start + *d, f.clone()))
            .collect();
        Self {
            background_left: setup.background_records,
            next_background: (setup.background_records > 0).then_some(start),
            rng,
            start,
            now: start,
            steps: 0,
            net,
            store,
            _dir: dir,
            hub: Hub {
                coord: GroupCoordinator::new(Default::default()),
                producers: 0,
                publishers: HashMap::new(),
                dedup_hits: 0,
            },
            shards,
            consumers,
            producer,
            faults,
            next_key: 0,
            next_member: 0,
            member_lost: false,
            members: HashMap::new(),
            handovers: Vec::new(),
            report: Report::default(),
            trace: std::env::var_os("SIM_TRACE").is_some(),
            setup,
        }
    }

    /// Prints a trace line under `SIM_TRACE=1`.
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!(
                "{:>8.3} ms  {}",
                self.elapsed().as_secs_f64() * 1000.0,
                what()
            );
        }
    }

    fn server_ms(&self) -> u64 {
        BASE_MS + (self.now - self.start).as_millis() as u64
    }

    /// Virtual time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    // -- stepping ------------------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let now = self.now;
        let mut t: Vec<Option<Instant>> = vec![
            self.net.next_at(),
            self.faults.front().map(|f| f.0),
            self.next_background,
            self.hub.coord.poll_timeout(),
        ];
        for c in &self.consumers {
            if !c.started {
                t.push(Some(self.start + c.spec.join_at));
                continue;
            }
            t.push(c.cm.poll_timeout());
            if c.conn.is_some() {
                t.push(c.sub.poll_timeout(now));
            }
            t.push(c.next_take);
        }
        for s in self.shards.iter().filter(|s| s.alive) {
            for sub in s.sessions.values().flatten() {
                t.push(sub.flow.poll_timeout());
                t.extend(sub.pumps.values().map(|p| p.deadline(now)));
            }
        }
        if let Some(p) = &self.producer {
            t.push(p.pm.poll_timeout());
            t.push(p.reconnect_at);
            t.push(p.next_push);
        }
        t.into_iter().flatten().min().map(|t| t.max(now))
    }

    /// Advances to the next deadline and handles everything due; false when nothing is left.
    fn step(&mut self) -> bool {
        self.steps += 1;
        assert!(
            self.steps < MAX_STEPS,
            "livelock: {MAX_STEPS} steps at {:?}",
            self.elapsed()
        );
        let Some(next) = self.next_deadline() else {
            return false;
        };
        self.now = next;
        let now = next;
        while self.faults.front().is_some_and(|f| f.0 <= now) {
            let (_, f) = self.faults.pop_front().expect("checked");
            self.fault(f);
        }
        while let Some(m) = self.net.pop_due(now) {
            self.deliver(m);
        }
        if self.next_background.is_some_and(|t| t <= now) {
            self.background();
        }
        if self.hub.coord.poll_timeout().is_some_and(|t| t <= now) {
            self.hub.coord.handle_timeout(now);
            self.hub_pushes();
        }
        for i in 0..self.consumers.len() {
            self.consumer_timers(i);
        }
        for s in 0..self.shards.len() {
            self.shard_timers(s);
        }
        self.producer_timers();
        true
    }

    /// Runs until `at` (virtual time since the start).
    pub(crate) fn run_for(&mut self, d: Duration) {
        let until = self.start + d;
        while self.next_deadline().is_some_and(|t| t <= until) {
            self.step();
        }
        self.now = self.now.max(until);
    }

    /// Runs until `done` holds, at most `limit` more virtual time; panics with `what` if it
    /// does not.
    pub(crate) fn run_until(&mut self, limit: Duration, what: &str, done: impl Fn(&Sim) -> bool) {
        let until = self.now + limit;
        while !done(self) {
            assert!(
                self.next_deadline().is_some_and(|t| t <= until) && self.step(),
                "{what} not reached within {limit:?} (at {:?})",
                self.elapsed()
            );
        }
    }

    // -- faults --------------------------------------------------------------------------------

    fn fault(&mut self, f: Fault) {
        let now = self.now;
        match f {
            Fault::KillConsumerConn(i) => {
                if let Some(c) = self.consumers[i].conn {
                    self.net.kill(now, c);
                }
            }
            Fault::KillShardOf(i) => {
                let shard = self.consumers[i]
                    .conn
                    .and_then(|c| self.net.conns.get(&c))
                    .map(|c| c.server);
                if let Some(Party::Shard(s)) = shard {
                    self.fault(Fault::KillShard(s));
                }
            }
            Fault::KillShard(s) => {
                let shard = &mut self.shards[s];
                shard.alive = false;
                shard.sessions.clear();
                let conns: Vec<u64> = self
                    .net
                    .conns
                    .iter()
                    .filter(|(_, c)| c.alive && c.server == Party::Shard(s))
                    .map(|(&id, _)| id)
                    .collect();
                for c in conns {
                    self.net.kill(now, c);
                }
                let link = self.shards[s].link;
                self.net.kill(now, link);
            }
            Fault::KillProducerConn => {
                if let Some(c) = self.producer.as_ref().and_then(|p| p.conn) {
                    self.net.kill(now, c);
                }
            }
            Fault::SetRate(i, r) => {
                let c = &mut self.consumers[i];
                c.rate = r;
                if c.next_take.is_none() && c.waiting_since.is_none() && r > 0.0 {
                    c.next_take = Some(now);
                }
            }
        }
    }

    // -- delivery ------------------------------------------------------------------------------

    fn deliver(&mut self, m: Msg) {
        let Some(conn) = self.net.conns.get(&m.conn) else {
            return;
        };
        let closed = matches!(m.payload, Payload::Closed);
        if !conn.alive && !closed {
            return;
        }
        let to = if m.to_client {
            conn.client
        } else {
            conn.server
        };
        match to {
            Party::Consumer(i) => self.consumer_msg(i, m),
            Party::Shard(s) => self.shard_msg(s, m),
            Party::Hub => self.hub_msg(m),
            Party::Producer => self.producer_msg(m),
        }
    }

    // -- the hub -------------------------------------------------------------------------------

    fn hub_msg(&mut self, m: Msg) {
        let now = self.now;
        match m.payload {
            Payload::Hello => {
                // Live shards, in a random order (the hub's ranking).
                let mut live: Vec<usize> = (0..self.shards.len())
                    .filter(|&s| self.shards[s].alive)
                    .collect();
                let n = live.len();
                if n > 1 {
                    live.rotate_left(self.rng.random_range(0..n));
                }
                let ticket = Ticket {
                    version: 1,
                    token: vec![7; 16],
                    session_secret: [1; 32],
                    shard_group: 0,
                    expires_at: self.server_ms() / 1000 + 3600,
                    endpoints: live.into_iter().map(endpoint).collect(),
                };
                self.net
                    .frame(now, m.conn, true, StreamId::Session, Frame::Ticket(ticket));
            }
            Payload::Closed => {
                if let Some(s) = self.shards.iter().position(|s| s.link == m.conn) {
                    let link = self.shards[s].link_id;
                    self.hub.coord.link_closed(link, now);
                    self.member_lost = true;
                    self.hub_pushes();
                }
                self.hub.publishers.remove(&m.conn);
            }
            Payload::Link(l) => {
                match l {
                    LinkMsg::Join { who, group, starts } => {
                        self.hub
                            .coord
                            .join(who, STREAM, &group, self.setup.partitions, &starts, now)
                            .expect("join");
                    }
                    LinkMsg::Leave(who) => {
                        self.member_lost = true;
                        let _ = self.hub.coord.leave(who, now);
                    }
                    LinkMsg::Position {
                        who,
                        partition,
                        next_offset,
                        serving,
                    } => {
                        let r = self
                            .hub
                            .coord
                            .position(who, partition, next_offset, serving, now);
                        self.trace(|| {
                            format!(
                                "hub: {who:?} p{partition} at {next_offset} serving {serving}: {r:?}"
                            )
                        });
                        if r == PositionReport::HandedOver
                            && let Some(&c) = self.members.get(&who)
                        {
                            self.handovers.push((c, partition, next_offset));
                        }
                    }
                    LinkMsg::Forecast(who, loads) => {
                        let _ = self.hub.coord.forecast(who, &loads, now);
                    }
                    LinkMsg::Push(_) => unreachable!("the hub pushes"),
                }
                self.hub_pushes();
            }
            Payload::Frame(b) => match decode(&b) {
                Frame::PublishOpen(o) => self.hub_publish_open(m.conn, o),
                Frame::Produce(p) => self.hub_produce(m.conn, p),
                f => panic!("hub got {:?}", f.frame_type()),
            },
            Payload::Fin => {}
        }
    }

    fn hub_pushes(&mut self) {
        let now = self.now;
        for push in self.hub.coord.poll_pushes() {
            self.trace(|| format!("hub pushes {push:?}"));
            if let Some(s) = self.shards.iter().find(|s| s.link_id == push.to.link) {
                let link = s.link;
                self.net.send(
                    now,
                    link,
                    true,
                    StreamId::Link,
                    Payload::Link(LinkMsg::Push(push)),
                );
            }
        }
    }

    fn hub_publish_open(&mut self, conn: u64, o: PublishOpen) {
        let id = match o.producer_id {
            Some(0) => {
                self.hub.producers += 1;
                self.hub.producers
            }
            Some(id) => {
                assert_eq!(o.producer_token, Some(token(id)), "producer token");
                id
            }
            None => panic!("the simulated producer is idempotent"),
        };
        self.hub.publishers.insert(conn, id);
        let a = PublishAccepted {
            partitions: self.setup.partitions,
            max_frame: 1 << 20,
            producer_id: Some(id),
            producer_token: Some(token(id)),
            max_in_flight: Some(PRODUCER_WINDOW as u32),
        };
        self.net.frame(
            self.now,
            conn,
            true,
            StreamId::Publish,
            Frame::PublishAccepted(a),
        );
    }

    fn hub_produce(&mut self, conn: u64, p: Produce) {
        let producer = *self
            .hub
            .publishers
            .get(&conn)
            .expect("Produce after PublishOpen");
        let recs = p.to_records();
        let records: Vec<StoreRecord<'_>> = recs
            .iter()
            .map(|r| StoreRecord {
                timestamp_ms: r.timestamp,
                key: &r.key,
                payload: &r.payload,
            })
            .collect();
        let (outcomes, err) = self
            .store
            .append_idempotent(
                STREAM,
                p.partition(),
                producer,
                &[ProducerBatch {
                    seq: p.seq(),
                    records: &records,
                }],
                self.server_ms(),
            )
            .expect("append_idempotent");
        assert!(err.is_none(), "store write failed: {err:?}");
        let (base_offset, count) = match outcomes[0] {
            BatchOutcome::Appended { base_offset, count } => (base_offset, count),
            BatchOutcome::Duplicate { base_offset, count } => {
                self.hub.dedup_hits += 1;
                (base_offset, count)
            }
            o => panic!("batch seq {} answered {o:?}", p.seq()),
        };
        let ack = ProduceAck {
            seq: p.seq(),
            partition: p.partition(),
            base_offset,
            count,
        };
        self.net.frame(
            self.now,
            conn,
            true,
            StreamId::Publish,
            Frame::ProduceAck(ack),
        );
        self.wake_tail(p.partition());
    }

    // -- writers -------------------------------------------------------------------------------

    fn background(&mut self) {
        let p = self.rng.random_range(0..self.setup.partitions);
        let n = self.rng.random_range(1..=3u64).min(self.background_left);
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("bg-{}", self.background_left - i).into_bytes())
            .collect();
        let recs: Vec<StoreRecord<'_>> = payloads
            .iter()
            .map(|pl| StoreRecord {
                timestamp_ms: self.server_ms(),
                key: b"k",
                payload: pl,
            })
            .collect();
        self.store.append(STREAM, p, &recs).expect("append");
        self.background_left -= n;
        self.next_background = (self.background_left > 0).then(|| {
            let mean = self.setup.produce_for.as_micros() as u64 * 2
                / self.setup.background_records.max(1);
            self.now + Duration::from_micros(self.rng.random_range(0..=mean * 2))
        });
        self.wake_tail(p);
    }

    fn wake_tail(&mut self, partition: u32) {
        for s in &mut self.shards {
            for sub in s.sessions.values_mut().flatten() {
                if let Some(p) = sub.pumps.get_mut(&partition)
                    && matches!(p.state, PumpState::Tail(_))
                {
                    p.state = PumpState::Ready;
                }
            }
        }
    }

    fn producer_timers(&mut self) {
        let now = self.now;
        let parts = self.setup.partitions;
        let per = self.setup.produce_for.as_micros() as u64 / self.setup.produced_records.max(1);
        let Some(p) = self.producer.as_mut() else {
            return;
        };
        if p.reconnect_at.is_some_and(|t| t <= now) {
            p.reconnect_at = None;
            let c = self.net.open(Party::Producer, Party::Hub);
            p.conn = Some(c);
            p.accepted = false;
            let open = p.pm.open_frame(STREAM);
            self.net
                .frame(now, c, false, StreamId::Publish, Frame::PublishOpen(open));
        }
        if p.next_push.is_some_and(|t| t <= now) {
            let id = p.pushed;
            p.pushed += 1;
            let rec = NewRecord {
                timestamp: BASE_MS,
                key: b"k".to_vec(),
                payload: format!("id-{id}").into_bytes(),
            };
            let partition = self.rng.random_range(0..parts);
            p.pm.push(partition, 32, Item { id, rec }, now);
            p.next_push = (p.pushed < p.total)
                .then(|| now + Duration::from_micros(self.rng.random_range(0..=2 * per)));
            if p.next_push.is_none() {
                p.pm.seal_all();
            }
        }
        if p.pm.poll_timeout().is_some_and(|t| t <= now) {
            p.pm.handle_timeout(now);
        }
        Self::producer_transmit(&mut self.net, now, p);
    }

    fn producer_transmit(net: &mut Net, now: Instant, p: &mut Producer) {
        let (Some(c), true) = (p.conn, p.accepted) else {
            return;
        };
        while let Some(t) = p.pm.poll_transmit() {
            let produce = Produce::new(t.seq, t.partition, t.items.iter().map(|i| i.rec.as_ref()))
                .expect("a batch");
            net.frame(now, c, false, StreamId::Publish, Frame::Produce(produce));
        }
    }

    fn producer_msg(&mut self, m: Msg) {
        let now = self.now;
        let Some(p) = self.producer.as_mut() else {
            return;
        };
        if p.conn != Some(m.conn) {
            return;
        }
        match m.payload {
            Payload::Closed => {
                p.conn = None;
                p.accepted = false;
                p.pm.handle_stream_lost();
                p.reconnect_at = Some(now + Duration::from_millis(self.rng.random_range(5..60)));
            }
            Payload::Frame(b) => match decode(&b) {
                Frame::PublishAccepted(a) => {
                    p.pm.handle_accepted(&a).expect("same producer");
                    p.accepted = true;
                }
                Frame::ProduceAck(a) => {
                    let items = p.pm.handle_ack(&a).expect("ack matches the oldest batch");
                    for (i, it) in items.into_iter().enumerate() {
                        let at = (a.partition, a.base_offset + i as u64);
                        assert!(
                            p.acked.insert(it.id, at).is_none(),
                            "record {} acked twice",
                            it.id
                        );
                    }
                }
                f => panic!("producer got {:?}", f.frame_type()),
            },
            _ => {}
        }
        Self::producer_transmit(&mut self.net, now, p);
    }

    // -- consumers -----------------------------------------------------------------------------

    fn consumer_timers(&mut self, i: usize) {
        let now = self.now;
        let c = &mut self.consumers[i];
        if !c.started {
            if self.start + c.spec.join_at > now {
                return;
            }
            c.started = true;
            c.cm.connect(now);
            c.next_take = Some(now);
        }
        if c.cm.poll_timeout().is_some_and(|t| t <= now) {
            c.cm.handle_timeout(now);
        }
        if c.next_take.is_some_and(|t| t <= now) {
            self.app_take(i);
        }
        self.consumer_actions(i);
        self.consumer_transmit(i);
    }

    /// The app takes one record (or finds none).
    fn app_take(&mut self, i: usize) {
        let now = self.now;
        let ends = self.log_ends();
        let c = &mut self.consumers[i];
        let Some((n, p, rec)) = c.queue.pop_front() else {
            c.next_take = None;
            if c.waiting_since.is_none() {
                c.waiting_since = Some(now);
                c.sub.on_starved(now);
                let pos = c.sub.positions();
                let available = c
                    .sub
                    .assigned()
                    .iter()
                    .any(|p| ends[*p as usize] > pos.get(p).copied().unwrap_or(0));
                c.starved_since = available.then_some(now);
            }
            return;
        };
        if let Some(t) = c.starved_since.take() {
            let d = now - t;
            self.report.max_starved_ms = self.report.max_starved_ms.max(d.as_millis() as u64);
            if d > self.setup.starve_bound {
                self.report.starved_over_bound += 1;
            }
        }
        let bytes = (rec.key.len() + rec.payload.len()) as u64;
        c.queue_bytes -= bytes;
        c.next_take = (c.rate > 0.0).then(|| now + Duration::from_secs_f64(1.0 / c.rate));
        if c.sub.on_deliver(p, rec.offset, now) == Deliver::Duplicate {
            self.report.sdk_duplicates += 1;
            c.next_take = Some(now);
            return;
        }
        assert!(
            c.stale_before.get(&p).is_none_or(|&b| n > b),
            "consumer {i} delivered offset {} of partition {p}, queued before it was revoked",
            rec.offset
        );
        let waited = c.waiting_since.take().map(|t| now - t);
        c.sub.took(p, bytes, waited, now);
        let d = c.delivered.entry(p).or_default();
        assert!(
            d.last().is_none_or(|&l| rec.offset > l),
            "consumer {i} partition {p}: offset {} after {:?}",
            rec.offset,
            d.last()
        );
        d.push(rec.offset);
        self.report.delivered += 1;
        self.trace(|| format!("consumer {i} delivers p{p} offset {}", rec.offset));
        let stored = self
            .store
            .read(STREAM, p, rec.offset, 1, usize::MAX)
            .expect("read");
        assert!(
            stored.first().is_some_and(|s| s.offset == rec.offset
                && s.payload == rec.payload
                && s.key == rec.key),
            "consumer {i} partition {p}: offset {} is not the log's record",
            rec.offset
        );
    }

    fn consumer_actions(&mut self, i: usize) {
        let now = self.now;
        while let Some(a) = self.consumers[i].cm.poll_action() {
            match a {
                ClientAction::ConnectHub => {
                    let c = self.net.open(Party::Consumer(i), Party::Hub);
                    self.net
                        .send(now, c, false, StreamId::Session, Payload::Hello);
                }
                ClientAction::ConnectShards { attempts } => {
                    for at in attempts {
                        let s = shard_of(&at.endpoint);
                        let conn = self.net.open(Party::Consumer(i), Party::Shard(s));
                        self.consumers[i].attempts.insert(at.id, (conn, s));
                        let attach = Attach {
                            token: vec![7; 16],
                            proof: [0; 32],
                            client_id: format!("c{i}"),
                            resume: None,
                        };
                        self.net
                            .frame(now, conn, false, StreamId::Session, Frame::Attach(attach));
                    }
                }
                ClientAction::Abandon { id } => {
                    if let Some((conn, _)) = self.consumers[i].attempts.remove(&id) {
                        self.net.kill(now, conn);
                    }
                }
                ClientAction::Attached { id, .. } => {
                    let c = &mut self.consumers[i];
                    let (conn, _) = c.attempts.remove(&id).expect("attached attempt");
                    c.conn = Some(conn);
                    c.attaches += 1;
                    let start = c.sub.begin_generation();
                    let sub = Subscribe {
                        sub_id: 1,
                        stream: STREAM.into(),
                        start,
                        group: c.spec.group.clone(),
                        mode: c.spec.mode,
                    };
                    self.net
                        .frame(now, conn, false, StreamId::Control, Frame::Subscribe(sub));
                }
                ClientAction::GiveUp { code } => panic!("consumer {i} gave up: {code:?}"),
                a => panic!("unexpected {a:?}"),
            }
        }
    }

    fn consumer_transmit(&mut self, i: usize) {
        let now = self.now;
        let c = &mut self.consumers[i];
        let Some(conn) = c.conn else {
            return;
        };
        while let Some(t) = c.sub.poll_transmit(now) {
            let f = match t {
                SubTransmit::Position(p) => Frame::Position(p),
                SubTransmit::Fetch(f) => Frame::Fetch(f),
                SubTransmit::Forecast(f) => Frame::Forecast(f),
            };
            self.net.frame(now, conn, false, StreamId::Control, f);
        }
    }

    fn consumer_msg(&mut self, i: usize, m: Msg) {
        let now = self.now;
        let server_now = self.server_ms();
        let c = &mut self.consumers[i];
        match m.payload {
            Payload::Closed => {
                c.readers.retain(|k, _| k.0 != m.conn);
                if c.conn == Some(m.conn) {
                    c.conn = None;
                    c.cm.handle_disconnected(None, now);
                } else if let Some((&id, _)) = c.attempts.iter().find(|(_, a)| a.0 == m.conn) {
                    c.attempts.remove(&id);
                    c.cm.handle_shard_failed(id, None, now);
                }
            }
            Payload::Fin => {
                if let Some(Reader_::Current(id, p)) = c.readers.remove(&(m.conn, m.stream)) {
                    c.sub.reader_ended(id, p);
                }
            }
            Payload::Frame(b) => {
                let f = decode(&b);
                match (m.stream, f) {
                    (StreamId::Session, Frame::Ticket(t)) => {
                        c.cm.handle_ticket(t, now, server_now / 1000);
                    }
                    (StreamId::Session, Frame::Attached(_)) => {
                        if let Some((&id, _)) = c.attempts.iter().find(|(_, a)| a.0 == m.conn) {
                            c.cm.handle_attached(id, now);
                        }
                    }
                    (_, _) if c.conn != Some(m.conn) => {}
                    (StreamId::Control, Frame::Grant(g)) => {
                        c.sub.handle_grant(g, now, server_now);
                    }
                    (StreamId::Control, Frame::Assignment(a)) => {
                        if self.trace {
                            println!("consumer {i} assignment {a:?}");
                        }
                        let before = c.sub.assigned();
                        let stop = c
                            .sub
                            .handle_assignment(&a, now)
                            .unwrap_or_else(|e| panic!("consumer {i}: {e}"));
                        let after = c.sub.assigned();
                        for p in before.into_iter().filter(|p| !after.contains(p)) {
                            c.stale_before.insert(p, c.pushes);
                        }
                        for r in c.readers.values_mut() {
                            if matches!(r, Reader_::Current(id, _) if stop.contains(id)) {
                                *r = Reader_::Stale;
                            }
                        }
                    }
                    (StreamId::Part(..), Frame::PartitionOpen(o)) => {
                        let r = match c.sub.open_partition(&o) {
                            Open::Accept { id, replaces } => {
                                for r in c.readers.values_mut() {
                                    if matches!(r, Reader_::Current(old, _) if Some(*old) == replaces)
                                    {
                                        *r = Reader_::Stale;
                                    }
                                }
                                Reader_::Current(id, o.partition)
                            }
                            Open::Stale => Reader_::Stale,
                        };
                        if self.trace {
                            println!("consumer {i} {o:?}: {r:?}");
                        }
                        c.readers.insert((m.conn, m.stream), r);
                    }
                    (StreamId::Part(..), Frame::Records(r)) => {
                        if self.trace {
                            println!(
                                "consumer {i} {:?} records {}..{} reader {:?}",
                                m.stream,
                                r.base_offset(),
                                r.next_offset(),
                                c.readers.get(&(m.conn, m.stream))
                            );
                        }
                        if let Some(&Reader_::Current(id, p)) = c.readers.get(&(m.conn, m.stream))
                            && c.sub.on_received(id, p, u64::from(r.count()))
                        {
                            for rec in r.to_records() {
                                c.queue_bytes += (rec.key.len() + rec.payload.len()) as u64;
                                c.pushes += 1;
                                c.queue.push_back((c.pushes, p, rec));
                            }
                            if c.next_take.is_none() && c.rate > 0.0 {
                                c.next_take = Some(now);
                            }
                        }
                    }
                    (s, f) => panic!("consumer {i} got {:?} on {s:?}", f.frame_type()),
                }
            }
            _ => {}
        }
        self.consumer_actions(i);
        self.consumer_transmit(i);
    }

    // -- shards --------------------------------------------------------------------------------

    fn shard_msg(&mut self, s: usize, m: Msg) {
        let now = self.now;
        if !self.shards[s].alive {
            return;
        }
        match m.payload {
            Payload::Closed => {
                if let Some(Some(sub)) = self.shards[s].sessions.remove(&m.conn) {
                    self.shards[s].planner.remove_sub(sub.key);
                    if let Some(who) = sub.member {
                        let link = self.shards[s].link;
                        self.net.send(
                            now,
                            link,
                            false,
                            StreamId::Link,
                            Payload::Link(LinkMsg::Leave(who)),
                        );
                    }
                }
            }
            Payload::Link(LinkMsg::Push(push)) => {
                let found = self.shards[s]
                    .sessions
                    .iter()
                    .find(|(_, sub)| sub.as_ref().is_some_and(|x| x.member == Some(push.to)))
                    .map(|(&c, _)| c);
                if let Some(conn) = found {
                    let owned = push.partitions.iter().map(|&(p, o)| (p, Some(o))).collect();
                    self.shard_owned(s, conn, owned);
                }
            }
            Payload::Frame(b) => {
                let f = decode(&b);
                match f {
                    Frame::Attach(_) => {
                        self.shards[s].sessions.insert(m.conn, None);
                        let a = Attached {
                            session_id: m.conn,
                            limits: SessionLimits {
                                max_streams: 100,
                                max_frame: 1 << 20,
                                idle_timeout_ms: 30_000,
                            },
                            server_time: self.server_ms(),
                        };
                        self.net
                            .frame(now, m.conn, true, StreamId::Session, Frame::Attached(a));
                    }
                    Frame::Subscribe(sub) => self.shard_subscribe(s, m.conn, sub),
                    f @ (Frame::Position(_) | Frame::Fetch(_) | Frame::Forecast(_)) => {
                        let shard = &mut self.shards[s];
                        if let Some(Some(sub)) = shard.sessions.get_mut(&m.conn) {
                            if let Frame::Forecast(fc) = &f {
                                sub.capacity = Some(fc.buffer_capacity_bytes);
                            }
                            sub.flow
                                .handle_frame(f, now, RTT, &mut shard.planner)
                                .expect("a control frame the flow accepts");
                        }
                        self.shard_drain(s, m.conn);
                    }
                    f => panic!("shard got {:?}", f.frame_type()),
                }
            }
            _ => {}
        }
    }

    fn resolve(&self, p: u32, start: &Start) -> u64 {
        let (lo, hi) = self.store.bounds(STREAM, p).expect("bounds");
        match start {
            Start::Latest => hi,
            Start::Offsets(m) => m.get(&p).copied().unwrap_or(lo).clamp(lo, hi),
            _ => lo,
        }
    }

    fn shard_subscribe(&mut self, s: usize, conn: u64, sub: Subscribe) {
        let now = self.now;
        self.next_key += 1;
        let key = SubKey(self.next_key);
        let shard = &mut self.shards[s];
        let flow = Flow::new(
            self.setup.flow,
            &sub,
            self.setup.partitions,
            key,
            now,
            RTT,
            &mut shard.planner,
        );
        let member = sub.group.as_ref().map(|_| {
            self.next_member += 1;
            LinkMember {
                link: shard.link_id,
                member: MemberId(self.next_member),
            }
        });
        if let (Some(who), Some(Party::Consumer(i))) =
            (member, self.net.conns.get(&conn).map(|c| c.client))
        {
            self.members.insert(who, i);
        }
        shard.sessions.insert(
            conn,
            Some(ShardSub {
                flow,
                key,
                sub_id: sub.sub_id,
                member,
                pumps: BTreeMap::new(),
                capacity: None,
            }),
        );
        match (&sub.group, member) {
            (Some(g), Some(who)) => {
                let starts = (0..self.setup.partitions)
                    .map(|p| (p, self.resolve(p, &sub.start)))
                    .collect();
                let link = self.shards[s].link;
                let join = LinkMsg::Join {
                    who,
                    group: g.clone(),
                    starts,
                };
                self.net
                    .send(now, link, false, StreamId::Link, Payload::Link(join));
                self.shard_drain(s, conn);
            }
            _ => {
                let owned = (0..self.setup.partitions).map(|p| (p, None)).collect();
                self.shard_owned(s, conn, owned);
            }
        }
    }

    /// A new owned set (all partitions, or a group push): resolves the starts.
    fn shard_owned(&mut self, s: usize, conn: u64, owned: Vec<(u32, Option<u64>)>) {
        let shard = &mut self.shards[s];
        let Some(Some(sub)) = shard.sessions.get_mut(&conn) else {
            return;
        };
        let starts = sub.flow.handle_owned(owned, &mut shard.planner);
        let resolved: Vec<(u32, u64)> = starts
            .into_iter()
            .map(|(p, at)| match at {
                StartAt::Kept(o) => (p, o),
                StartAt::Resolve(st) => (p, self.resolve(p, &st)),
            })
            .collect();
        let shard = &mut self.shards[s];
        if let Some(Some(sub)) = shard.sessions.get_mut(&conn) {
            sub.flow.handle_starts(resolved, &shard.planner);
        }
        self.shard_drain(s, conn);
    }

    /// Drains a flow's outputs: control frames, group reports, pump events.
    fn shard_drain(&mut self, s: usize, conn: u64) {
        let now = self.now;
        let server_ms = self.server_ms();
        let shard = &mut self.shards[s];
        let link = shard.link;
        let Some(Some(sub)) = shard.sessions.get_mut(&conn) else {
            return;
        };
        while let Some(t) = sub.flow.poll_transmit() {
            let f = match t {
                FlowTransmit::Grant { rate, burst, lease } => Frame::Grant(Grant {
                    rate_records_per_s: rate,
                    burst,
                    lease_expires_ms: server_ms + lease.as_millis() as u64,
                }),
                FlowTransmit::Assignment(a) => Frame::Assignment(a),
            };
            self.net.frame(now, conn, true, StreamId::Control, f);
        }
        while let Some(r) = sub.flow.poll_relay() {
            let Some(who) = sub.member else { continue };
            let l = match r {
                GroupRelay::Position {
                    partition,
                    next_offset,
                    serving,
                } => LinkMsg::Position {
                    who,
                    partition,
                    next_offset,
                    serving,
                },
                GroupRelay::Forecast(loads) => LinkMsg::Forecast(who, loads),
            };
            self.net
                .send(now, link, false, StreamId::Link, Payload::Link(l));
        }
        while let Some(e) = sub.flow.poll_pump() {
            match e {
                PumpEvent::Start {
                    partition, epoch, ..
                } => {
                    sub.pumps.insert(
                        partition,
                        Pump {
                            epoch,
                            state: PumpState::Ready,
                        },
                    );
                    let open = PartitionOpen {
                        sub_id: sub.sub_id,
                        partition,
                        epoch,
                    };
                    let st = StreamId::Part(partition, epoch);
                    self.net
                        .frame(now, conn, true, st, Frame::PartitionOpen(open));
                }
                PumpEvent::Stop(p) => {
                    if let Some(pump) = sub.pumps.remove(&p) {
                        let st = StreamId::Part(p, pump.epoch);
                        self.net.send(now, conn, true, st, Payload::Fin);
                    }
                }
                PumpEvent::Wake(p) => {
                    if let Some(pump) = sub.pumps.get_mut(&p) {
                        pump.state = match std::mem::replace(&mut pump.state, PumpState::Ready) {
                            PumpState::Held(r, b, _) => PumpState::Held(r, b, now),
                            PumpState::Tail(t) => PumpState::Tail(t),
                            _ => PumpState::Ready,
                        };
                    }
                }
            }
        }
    }

    fn shard_timers(&mut self, s: usize) {
        let now = self.now;
        if !self.shards[s].alive {
            return;
        }
        let conns: Vec<u64> = self.shards[s].sessions.keys().copied().collect();
        for conn in conns {
            let shard = &mut self.shards[s];
            let Some(Some(sub)) = shard.sessions.get_mut(&conn) else {
                continue;
            };
            if sub.flow.poll_timeout().is_some_and(|t| t <= now) {
                sub.flow.handle_timeout(now, &mut shard.planner);
            }
            let due: Vec<u32> = sub
                .pumps
                .iter()
                .filter(|(_, p)| p.deadline(now).is_some_and(|t| t <= now))
                .map(|(&p, _)| p)
                .collect();
            for p in due {
                self.run_pump(s, conn, p);
            }
            self.shard_drain(s, conn);
        }
    }

    /// One pump turn: read and send until the flow says wait or stop.
    fn run_pump(&mut self, s: usize, conn: u64, p: u32) {
        let now = self.now;
        let shard = &mut self.shards[s];
        let Some(Some(sub)) = shard.sessions.get_mut(&conn) else {
            return;
        };
        let Some(pump) = sub.pumps.get_mut(&p) else {
            return;
        };
        let epoch = pump.epoch;
        let st = StreamId::Part(p, epoch);
        for _ in 0..64 {
            let (records, batch) = match std::mem::replace(&mut pump.state, PumpState::Ready) {
                PumpState::Held(r, b, _) => (r, b),
                _ => {
                    let poll = sub.flow.poll_send(p, epoch, now, RTT, &mut shard.planner);
                    match poll.step {
                        PumpStep::Read {
                            from,
                            records,
                            max_bytes,
                        } => {
                            let got = self
                                .store
                                .read(STREAM, p, from, records as usize, max_bytes as usize)
                                .expect("a pump reads within the log");
                            if got.is_empty() {
                                pump.state = PumpState::Tail(now + 100 * MS);
                                return;
                            }
                            let r = Records::new(
                                p,
                                got.iter().map(|r| RecordRef {
                                    offset: r.offset,
                                    timestamp: r.timestamp_ms,
                                    key: &r.key,
                                    payload: &r.payload,
                                }),
                            )
                            .expect("a batch");
                            let b = Batch {
                                next_offset: r.next_offset(),
                                bytes: r.body_len() as u64,
                                records: u64::from(r.count()),
                            };
                            (Box::new(r), b)
                        }
                        PumpStep::Wait { until } => {
                            pump.state = PumpState::Wait(until);
                            return;
                        }
                        PumpStep::Stop => {
                            sub.pumps.remove(&p);
                            self.net.send(now, conn, true, st, Payload::Fin);
                            return;
                        }
                    }
                }
            };
            match sub
                .flow
                .admit_batch(p, epoch, batch, now, &mut shard.planner)
            {
                Admit::Send => {
                    self.net
                        .frame(now, conn, true, st, Frame::Records(*records));
                    if let Some(capacity) = sub.capacity {
                        // Within the advertised buffer, or one batch sent with nothing else
                        // in flight.
                        let inflight = sub.flow.inflight_bytes();
                        self.report.peak_inflight = self.report.peak_inflight.max(inflight);
                        assert!(
                            inflight <= capacity.max(batch.bytes),
                            "in flight {inflight} B over the client's buffer {capacity} B"
                        );
                    }
                }
                Admit::Wait { until } => {
                    pump.state = PumpState::Held(records, batch, until);
                    return;
                }
                Admit::Stop => {
                    sub.pumps.remove(&p);
                    self.net.send(now, conn, true, st, Payload::Fin);
                    return;
                }
            }
        }
        // Still sending: continue at the same instant, after the others.
        pump.state = PumpState::Ready;
    }

    // -- checks --------------------------------------------------------------------------------

    /// `(earliest, next)` of every partition.
    pub(crate) fn log_ends(&self) -> Vec<u64> {
        (0..self.setup.partitions)
            .map(|p| self.store.bounds(STREAM, p).expect("bounds").1)
            .collect()
    }

    /// Every writer is done and every acked batch acked.
    pub(crate) fn writers_done(&self) -> bool {
        self.background_left == 0
            && self
                .producer
                .as_ref()
                .is_none_or(|p| p.pushed == p.total && p.pm.is_idle())
    }

    /// Consumer `i` delivered everything the log holds.
    pub(crate) fn caught_up(&self, i: usize) -> bool {
        let c = &self.consumers[i];
        self.log_ends().iter().enumerate().all(|(p, &end)| {
            end == 0 || c.delivered.get(&(p as u32)).and_then(|d| d.last()) == Some(&(end - 1))
        })
    }

    /// The group's members together delivered everything the log holds.
    pub(crate) fn group_caught_up(&self) -> bool {
        let ends = self.log_ends();
        (0..self.setup.partitions).all(|p| {
            let end = ends[p as usize];
            end == 0
                || self
                    .consumers
                    .iter()
                    .any(|c| c.delivered.get(&p).and_then(|d| d.last()) == Some(&(end - 1)))
        })
    }

    /// Consumer `i` received every offset of the log once, in order.
    pub(crate) fn check_exact(&self, i: usize) {
        for (p, end) in self.log_ends().into_iter().enumerate() {
            let got = self.consumers[i]
                .delivered
                .get(&(p as u32))
                .cloned()
                .unwrap_or_default();
            let want: Vec<u64> = (0..end).collect();
            assert!(
                got == want,
                "consumer {i} partition {p}: delivered {} offsets, want 0..{end} exactly once \
                 (first difference at index {:?})",
                got.len(),
                got.iter().zip(&want).position(|(a, b)| a != b)
            );
        }
    }

    /// The group delivered every offset at least once; an offset delivered to two members
    /// needs a member loss, or (unless `strict`) a hand-over the hub completed at or below it
    /// on a `Position` of one of them (the crossing-`Position` race, see `simulation.rs`).
    /// Returns the duplicates after a member loss and those crossing a hand-over.
    pub(crate) fn check_group(&self, strict: bool) -> (u64, u64) {
        let (mut dups, mut crossing) = (0, 0);
        for (p, end) in self.log_ends().into_iter().enumerate() {
            let p = p as u32;
            let mut seen: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (i, c) in self.consumers.iter().enumerate() {
                for &o in c.delivered.get(&p).into_iter().flatten() {
                    seen.entry(o).or_default().push(i);
                }
            }
            let missing: Vec<u64> = (0..end).filter(|o| !seen.contains_key(o)).take(5).collect();
            assert!(
                missing.is_empty(),
                "partition {p}: offsets {missing:?} never delivered"
            );
            for (o, by) in seen.iter().filter(|(_, by)| by.len() > 1) {
                if self.member_lost {
                    dups += by.len() as u64 - 1;
                    continue;
                }
                crossing += by.len() as u64 - 1;
                assert!(
                    !strict,
                    "partition {p} offset {o} delivered to consumers {by:?}"
                );
                assert!(
                    self.handovers
                        .iter()
                        .any(|&(c, hp, x)| hp == p && x <= *o && by.contains(&c)),
                    "partition {p} offset {o} delivered to consumers {by:?} without a member \
                     loss or a hand-over below it"
                );
            }
        }
        (dups, crossing)
    }

    /// Every acked record is in the log once, at its acked offset; nothing else is.
    pub(crate) fn check_exactly_once(&self) {
        let Some(prod) = &self.producer else { return };
        let mut found: BTreeMap<u64, Vec<(u32, u64)>> = BTreeMap::new();
        for p in 0..self.setup.partitions {
            let end = self.store.bounds(STREAM, p).expect("bounds").1;
            for r in self
                .store
                .read(STREAM, p, 0, end as usize, usize::MAX)
                .expect("read")
            {
                let s = String::from_utf8(r.payload).expect("utf-8");
                if let Some(id) = s.strip_prefix("id-") {
                    found
                        .entry(id.parse().expect("an id"))
                        .or_default()
                        .push((p, r.offset));
                }
            }
        }
        assert_eq!(prod.acked.len() as u64, prod.total, "every record acked");
        for (id, at) in &prod.acked {
            assert_eq!(
                found.get(id).map(Vec::as_slice),
                Some(&[*at][..]),
                "record {id}: acked at {at:?}, in the log at {:?}",
                found.get(id)
            );
        }
        assert_eq!(
            found.len(),
            prod.acked.len(),
            "records in the log nobody acked"
        );
    }

    /// The run's figures.
    pub(crate) fn report(&mut self) -> Report {
        let mut r = self.report.clone();
        r.steps = self.steps;
        r.messages = self.net.sent;
        r.reconnects = self
            .consumers
            .iter()
            .map(|c| c.attaches.saturating_sub(1))
            .sum();
        if let Some(p) = &self.producer {
            r.resent = p.pm.resent();
        }
        r.dedup_hits = self.hub.dedup_hits;
        r.log_records = self.log_ends().iter().sum();
        r
    }
}

fn token(id: u64) -> [u8; PRODUCER_TOKEN_LEN] {
    let mut t = [0u8; PRODUCER_TOKEN_LEN];
    t[..8].copy_from_slice(&id.to_be_bytes());
    t
}
