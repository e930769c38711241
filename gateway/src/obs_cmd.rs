//! The binary's observability glue: starting the admin listener, and the operator commands
//! that read it (`status`, `streams describe`, `groups list|describe`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use tracing::info;

use sibyl_gateway::config::Config;
use sibyl_gateway::obs::admin::{self, AdminServer};
use sibyl_gateway::obs::client::{self, AdminClient};
use sibyl_gateway::obs::view::{ConsumerGroupView, NodeView};
use sibyl_gateway::store::Store;
use sibyl_gateway::storelink::StoreLinkServer;
use sibyl_gateway::supervisor::Supervisor;

/// Where the operator commands find the admin API.
#[derive(Debug, clap::Args)]
pub(crate) struct AdminArgs {
    /// Admin listener address; default: the one the hub wrote to `<data-dir>/run/admin.addr`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Data directory of the running hub (to find its admin address).
    #[arg(long, value_name = "DIR", default_value = "./sibyl-data")]
    data_dir: PathBuf,
    /// File holding the admin bearer token (`[admin] token_file`).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the JSON document instead of the summary.
    #[arg(long)]
    json: bool,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<AdminClient> {
        let addr = client::resolve_addr(self.admin, &self.data_dir)?;
        let token = self
            .token_file
            .as_deref()
            .map(admin::read_token)
            .transpose()?;
        Ok(AdminClient::new(addr, token))
    }
}

/// `sibyl-gateway groups …`.
#[derive(Debug, Subcommand)]
pub(crate) enum GroupsCmd {
    /// Consumer groups with members and lag.
    List(AdminArgs),
    /// One consumer group: owner, position, end and lag per partition.
    Describe {
        /// Stream.
        stream: String,
        /// Group name.
        group: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(crate) use client::addr_file;

/// Starts the admin listener when `[admin] enabled`, and writes its address to
/// `<data_dir>/run/admin.addr` for the operator commands.
pub(crate) fn start_admin(
    config: &Config,
    store: &Arc<Store>,
    supervisor: &Arc<Supervisor>,
    link: &Arc<StoreLinkServer>,
    hub_addr: SocketAddr,
) -> anyhow::Result<Option<AdminServer>> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let token = config
        .admin
        .token_file
        .as_deref()
        .map(admin::read_token)
        .transpose()?;
    let view = Arc::new(NodeView {
        store: store.clone(),
        supervisor: supervisor.clone(),
        link: Some(link.clone()),
        groups: config
            .shards
            .groups
            .iter()
            .map(|g| (g.id, g.shards))
            .collect(),
        hub_addr: hub_addr.to_string(),
        started: Instant::now(),
    });
    let server = AdminServer::start(config.admin.listen, view, token)?;
    let file = addr_file(&config.data_dir);
    std::fs::write(&file, format!("{}\n", server.local_addr()))
        .with_context(|| format!("writing {}", file.display()))?;
    info!(addr = %server.local_addr(), "admin listener started");
    Ok(Some(server))
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `sibyl-gateway status`.
pub(crate) fn status(a: &AdminArgs) -> anyhow::Result<ExitCode> {
    let s = a.client()?.status()?;
    if a.json {
        print_json(&s)?;
    } else {
        print!("{}", client::format_status(&s));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sibyl-gateway streams describe NAME`.
pub(crate) fn streams_describe(name: &str, a: &AdminArgs) -> anyhow::Result<ExitCode> {
    let s = a.client()?.status()?;
    let Some(st) = s.streams.iter().find(|x| x.name == name) else {
        eprintln!("no stream {name:?}");
        return Ok(ExitCode::FAILURE);
    };
    if a.json {
        print_json(st)?;
    } else {
        print!("{}", client::format_stream(st));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sibyl-gateway groups list|describe`.
pub(crate) fn groups(cmd: GroupsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        GroupsCmd::List(a) => {
            let gs: Vec<ConsumerGroupView> = a.client()?.get("/api/groups")?;
            if a.json {
                print_json(&gs)?;
            } else {
                print!("{}", client::format_groups(&gs));
            }
        }
        GroupsCmd::Describe {
            stream,
            group,
            admin,
        } => {
            let gs: Vec<ConsumerGroupView> = admin.client()?.get("/api/groups")?;
            let Some(g) = gs.iter().find(|g| g.stream == stream && g.group == group) else {
                eprintln!("no consumer group {group:?} on stream {stream:?}");
                return Ok(ExitCode::FAILURE);
            };
            if admin.json {
                print_json(g)?;
            } else {
                print!("{}", client::format_group(g));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Top-level sections (and `data_dir`) whose values differ between two configurations:
/// what a SIGHUP cannot apply.
pub(crate) fn changed_sections(running: &Config, file: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (toml::Value::try_from(running), toml::Value::try_from(file)) else {
        return vec!["(cannot compare)".to_owned()];
    };
    let (Some(a), Some(b)) = (a.as_table(), b.as_table()) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}
