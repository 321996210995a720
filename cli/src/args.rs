//! The command-line surface of `sluicectl`, declared with clap's derive API so the help
//! text, the parser and the types the commands receive never drift apart.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit status of a successful run.
pub const EXIT_OK: i32 = 0;
/// Exit status when an RPC fails, the control plane is unreachable, or a wait fails or
/// times out.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for a bad invocation: unknown flags, bad values, an unreadable or invalid
/// spec file (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

const AFTER_HELP: &str = "\
Exit status:
  0   success
  1   an RPC failed, the control plane was unreachable, or --wait failed or timed out
  64  usage error: bad flags or values, or an unreadable or invalid spec file

Authentication:
  Every call sends a bearer token: $SLUICE_TOKEN, else token: in the config file.
  An admin creates tokens with `sluice-control-plane tokens create`.

Examples:
  export SLUICE_TOKEN=sluice_...
  sluicectl create -f pipeline.yaml --wait
  sluicectl list -o json
  sluicectl pause orders-sync --wait
  SLUICE_SERVER=https://cp.internal:50051 sluicectl --ca-file ca.pem get orders-sync";

/// The operator's command line for Sluice pipelines.
#[derive(Debug, Parser)]
#[command(name = "sluicectl", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Address of the control plane's gRPC endpoint; "http://" is assumed when no scheme
    /// is given.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_SERVER",
        value_name = "URL"
    )]
    pub server: Option<String>,

    /// Config file (YAML: server, token, ca_file, client_cert, client_key) [default:
    /// ~/.config/sluice/config.yaml when it exists].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// CA certificate (PEM) to verify an https:// control plane with.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_CLIENT_CERT",
        requires = "client_key",
        value_name = "FILE"
    )]
    pub client_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_CLIENT_KEY",
        requires = "client_cert",
        value_name = "FILE"
    )]
    pub client_key: Option<PathBuf>,

    /// Send the token over plaintext http:// to a server that is not on this machine
    /// (refused otherwise: anyone on the path could read the token).
    #[arg(long, global = true, help_heading = "Global options")]
    pub insecure: bool,

    /// Output format.
    #[arg(short, long, global = true, help_heading = "Global options", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Deadline of each RPC, in seconds (also bounds connecting).
    #[arg(long, global = true, help_heading = "Global options", default_value_t = 10, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// Pretty-printed JSON, stable field names, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a pipeline from a spec file or from flags.
    #[command(after_help = "\
Spec file shape (YAML or JSON; unknown keys are rejected):
  id: orders-sync            # optional, otherwise generated
  desired_status: ACTIVE     # optional, ACTIVE (default) or PAUSED
  spec:
    source:
      type: generator
      config: {count: 1000}
    destination:
      type: postgres
      config: {table: orders}

Flags win over the file: --id replaces id, --paused replaces desired_status.

Examples:
  sluicectl create -f orders.yaml --wait
  cat orders.json | sluicectl create -f - --id orders-2 --paused
  sluicectl create --id demo --source-type generator --source-config '{\"count\": 10}' \\
      --destination-type postgres --destination-config '{\"table\": \"demo\"}'")]
    Create(CreateArgs),

    /// Create or update pipelines from a file of specs, showing what changes.
    #[command(after_help = "\
The file holds one or more pipeline documents in the shape `create -f` takes (YAML
documents separated by `---`, or JSON: one object or an array), each with its id. For
each: a pipeline that does not exist is created; one that exists gets the document's
spec (and desired_status, when given) and the change is shown as a diff of its desired
state. Secret fields are shown redacted; a change only to secrets says so. Every
document is read and checked before anything is sent, and each change is checked by
the server (validate_only) before it is made; the first refused document stops the
run, the ones before it stay applied.

With --dry-run nothing is changed: every document is checked by the server exactly as
a real apply would be, and the diffs are shown.

Examples:
  sluicectl apply -f pipelines.yaml --dry-run
  sluicectl apply -f pipelines.yaml
  sluicectl apply -f orders.json -o json")]
    Apply(ApplyArgs),

    /// Change a pipeline in your editor: its desired state (spec and desired_status) as
    /// YAML, applied like `apply -f` when you save.
    #[command(after_help = "\
The editor is $SLUICE_EDITOR, else $VISUAL, else $EDITOR, else vi. Leaving the file
unchanged (or emptying it) cancels. Secret values show as ******** and are kept unless
you replace them. The change is made against the version you opened: if someone else
changed the pipeline meanwhile, nothing is applied (ABORTED). When the server refuses
the edit, the file is kept and its path printed, to fix and `apply -f`.

Examples:
  sluicectl edit orders-sync
  SLUICE_EDITOR=nano sluicectl edit acme/orders-sync")]
    Edit {
        /// Pipeline id.
        id: String,
    },

    /// Show one pipeline.
    #[command(after_help = "Example:\n  sluicectl get orders-sync -o json")]
    Get {
        /// Pipeline id.
        id: String,
    },

    /// List pipelines, ordered by id.
    #[command(after_help = "\
All pages are fetched unless --limit is given. Filters combine with AND; a filter
given several times matches any of its values.

Examples:
  sluicectl list
  sluicectl list --status error
  sluicectl list --desired active --status setup --status backfill
  sluicectl list --status none          # no worker has reported on these yet
  sluicectl list --desired active --ids > active.txt
  sluicectl list --limit 20 -o json")]
    List(ListArgs),

    /// Pause a pipeline (sets desired_status to PAUSED).
    #[command(after_help = "\
With --wait, returns once the owning worker reports PAUSED for the new generation.

Example:
  sluicectl pause orders-sync --wait --wait-timeout 60")]
    Pause {
        /// Pipeline id.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },

    /// Resume a paused pipeline (sets desired_status to ACTIVE).
    #[command(after_help = "\
With --wait, returns once the owning worker reports READY for the new generation.

Example:
  sluicectl resume orders-sync --wait")]
    Resume {
        /// Pipeline id.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },

    /// Delete a pipeline; the worker tears it down, then it disappears.
    #[command(after_help = "\
With --wait, returns once the pipeline is gone (GetPipeline answers NOT_FOUND).

Example:
  sluicectl delete orders-sync --wait")]
    Delete {
        /// Pipeline id.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },

    /// Watch pipelines change, live: one line per change until interrupted.
    #[command(after_help = "\
Prints every pipeline the token can see (EXISTING), a SYNCED line, then one line per
change as it commits (CHANGED, REMOVED), until Ctrl-C. From SYNCED on, each -o json
line carries a resume_token; `--resume TOKEN` continues after it (changes may repeat,
none is lost; tokens last 24 hours).

Examples:
  sluicectl watch
  sluicectl watch orders-sync invoices-sync
  sluicectl watch -o json | jq -c 'select(.pipeline.status == \"ERROR\")'")]
    Watch {
        /// Only these pipelines (default: all).
        ids: Vec<String>,
        /// Continue after the event that carried this resume_token.
        #[arg(long, value_name = "TOKEN")]
        resume: Option<String>,
    },

    /// Show everything about one pipeline: status, spec, recent events and runs.
    #[command(after_help = "\
Shows the pipeline as `get` does (with the activity it is retrying, if any), its
desired status and spec (secrets redacted), its last status transitions and its latest
runs with their errors: the first command to run when a pipeline is stuck or failing.

Examples:
  sluicectl describe orders-sync
  sluicectl describe orders-sync --events 30 -o json")]
    Describe {
        /// Pipeline id.
        id: String,
        /// How many of the latest status transitions to show.
        #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        events: u32,
        /// How many of the latest runs to show.
        #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
    },

    /// Show the status transitions of a pipeline, oldest first (works after deletion).
    #[command(after_help = "Example:\n  sluicectl history orders-sync")]
    History {
        /// Pipeline id.
        id: String,
    },

    /// List the connector types this deployment knows, with their config schemas.
    #[command(after_help = "\
The table shows each type and the config keys that hold secrets; -o json adds the
full JSON schema of every config.

Examples:
  sluicectl connectors
  sluicectl connectors -o json | jq '.[] | select(.type == \"postgres\")'")]
    Connectors,

    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  sluicectl completion bash > /etc/bash_completion.d/sluicectl
  sluicectl completion zsh > \"${fpath[1]}/_sluicectl\"
  sluicectl completion fish > ~/.config/fish/completions/sluicectl.fish")]
    Completion {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },

    /// Show a pipeline's runs (its backfill and every sync), newest first.
    #[command(after_help = "\
Each run shows its trigger (initial, reset, spec-change, retry, schedule, manual),
records read from the source and written to the destination, and its outcome (running,
succeeded, failed, cancelled) with the error of a failed run.

Example:
  sluicectl runs orders-sync --limit 10")]
    Runs {
        /// Pipeline id.
        id: String,
        /// Show at most this many runs.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },

    /// Start a sync run now, without waiting for the pipeline's schedule.
    #[command(after_help = "\
The run reads what changed at the source since the last one. A pipeline still in its
backfill runs it after the backfill; a paused one once it resumes. With --request-id
(a UUID), a retried command starts no second run.

Example:
  sluicectl sync orders-sync --request-id 6f1c0b0e-3f5e-4a40-9b0a-0c5d2f0e9a11")]
    Sync {
        /// Pipeline id.
        id: String,
        /// Makes the call idempotent: the same id never starts a second run.
        #[arg(long, value_name = "UUID")]
        request_id: Option<String>,
    },

    /// Push inputs (e.g. webhook events) to a pipeline's live lane.
    #[command(after_help = "\
Each input is stored before the command returns, also while the pipeline is paused,
and applied exactly once while it is ACTIVE. --input takes one JSON value; --file takes
JSON Lines (one input per line; \"-\" reads standard input). Prints the sequence
number each input was stored under.

Examples:
  sluicectl push stripe-sync --input '{\"type\": \"customer.updated\", \"data\": {\"object\": {...}}}'
  sluicectl push orders-sync -f events.jsonl")]
    Push {
        /// Pipeline id.
        id: String,
        /// One input, as JSON.
        #[arg(
            long,
            value_name = "JSON",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        input: Option<String>,
        /// Inputs as JSON Lines.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
    },

    /// Forget the source progress of a paused pipeline so its next resume reads again.
    #[command(after_help = "\
Only while the pipeline is paused (desired PAUSED), else the call fails with
FAILED_PRECONDITION. Without --stream every stream is reset. Rows already at the
destination stay and are overwritten as the new backfill reaches them.

Example:
  sluicectl pause orders-sync --wait
  sluicectl reset orders-sync --stream orders
  sluicectl resume orders-sync --wait")]
    Reset {
        /// Pipeline id.
        id: String,
        /// A stream to reset (repeatable); none: all.
        #[arg(long = "stream", value_name = "NAME")]
        streams: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Pipeline id; overrides the file's id. Generated by the server when absent.
    #[arg(long)]
    pub id: Option<String>,

    /// Spec file (YAML or JSON); "-" reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Source connector type, e.g. generator.
    #[arg(
        long,
        value_name = "TYPE",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub source_type: Option<String>,

    /// Source connector configuration as a JSON object [default: {}].
    #[arg(long, value_name = "JSON", conflicts_with = "file")]
    pub source_config: Option<String>,

    /// Destination connector type, e.g. postgres.
    #[arg(
        long,
        value_name = "TYPE",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub destination_type: Option<String>,

    /// Destination connector configuration as a JSON object [default: {}].
    #[arg(long, value_name = "JSON", conflicts_with = "file")]
    pub destination_config: Option<String>,

    /// Create the pipeline paused; overrides the file's desired_status.
    #[arg(long)]
    pub paused: bool,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// File of pipeline documents (YAML or JSON); "-" reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,

    /// Check every document with the server and show the diffs; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Pipelines per page requested from the server (server default 50, at most 1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: Option<u32>,

    /// Stop after this many pipelines instead of fetching every page.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,

    /// Only pipelines whose reported status is this (repeatable).
    #[arg(long, value_enum, value_name = "STATUS")]
    pub status: Vec<StatusFilter>,

    /// Only pipelines whose desired status is this (repeatable).
    #[arg(long, value_enum, value_name = "DESIRED")]
    pub desired: Vec<DesiredFilter>,

    /// Only pipelines that this worker owns (repeatable): e.g. before and after draining
    /// a worker. Filtered by sluicectl after listing.
    #[arg(long, value_name = "WORKER")]
    pub owner: Vec<String>,

    /// Only pipelines whose latest change no worker has acted on yet: not owned, or
    /// the owner has not observed the current generation, or a pause, resume or delete
    /// is under way. Empty once everything has caught up (e.g. after an outage).
    #[arg(long)]
    pub unconverged: bool,

    /// Print only the ids, as tenant/id, one per line, whatever -o says (for scripts:
    /// `for id in $(sluicectl list --ids)`; every command accepts that form).
    #[arg(long)]
    pub ids: bool,
}

/// A reported status to list by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    /// No worker has reported on the pipeline yet.
    None,
    Setup,
    Backfill,
    Ready,
    Paused,
    Teardown,
    Error,
}

impl StatusFilter {
    pub fn to_pb(self) -> sluice_protocol::pb::PipelineStatus {
        use sluice_protocol::pb::PipelineStatus as S;
        match self {
            Self::None => S::Unspecified,
            Self::Setup => S::Setup,
            Self::Backfill => S::Backfill,
            Self::Ready => S::Ready,
            Self::Paused => S::Paused,
            Self::Teardown => S::Teardown,
            Self::Error => S::Error,
        }
    }
}

/// A desired status to list by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DesiredFilter {
    Active,
    Paused,
    Deleted,
}

impl DesiredFilter {
    pub fn to_pb(self) -> sluice_protocol::pb::DesiredStatus {
        use sluice_protocol::pb::DesiredStatus as D;
        match self {
            Self::Active => D::Active,
            Self::Paused => D::Paused,
            Self::Deleted => D::Deleted,
        }
    }
}

#[derive(Debug, Clone, Copy, Args)]
pub struct WaitArgs {
    /// Wait until the change has taken effect, showing progress on stderr.
    #[arg(long)]
    pub wait: bool,

    /// Give up waiting after this many seconds (exit status 1).
    #[arg(long, value_name = "SECS", default_value_t = 300, requires = "wait",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub wait_timeout: u64,
}

impl WaitArgs {
    /// The wait deadline, or None when the caller did not ask to wait.
    pub fn timeout(&self) -> Option<Duration> {
        self.wait.then(|| Duration::from_secs(self.wait_timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_needs_a_file_or_connector_types() {
        let err = Cli::try_parse_from(["sluicectl", "create"]).expect_err("missing spec");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        Cli::try_parse_from(["sluicectl", "create", "-f", "x.yaml"]).expect("file is enough");
        let err = Cli::try_parse_from([
            "sluicectl",
            "create",
            "-f",
            "x.yaml",
            "--source-type",
            "generator",
        ])
        .expect_err("file and flags conflict");
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn wait_timeout_defaults_and_requires_wait() {
        let cli = Cli::try_parse_from(["sluicectl", "pause", "p1", "--wait"]).expect("valid");
        let Command::Pause { wait, .. } = cli.command else {
            panic!("parsed as pause");
        };
        assert_eq!(wait.timeout(), Some(Duration::from_secs(300)));
        assert!(Cli::try_parse_from(["sluicectl", "pause", "p1", "--wait-timeout", "5"]).is_err());
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from(["sluicectl", "get", "p1", "-o", "json", "--timeout", "3"])
            .expect("valid");
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.rpc_timeout(), Duration::from_secs(3));
    }
}
