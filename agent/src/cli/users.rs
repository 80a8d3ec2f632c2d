//! `allod user`, `allod role`, `allod token`, `allod login` and `allod oidc`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::api_types::{CreateToken, CreateUser, GrantRole, IssuerSpec, Login};
use crate::cli::{
    body, default_config_path, emit, parse_duration_secs, print_table, read_line, request, text,
    ApiArgs, CliConfig, Output,
};

#[derive(Subcommand, Debug)]
pub enum OidcCommand {
    /// Add or replace an issuer whose bearer JWTs the API accepts.
    Add {
        /// The issuer's name in Allod.
        name: String,
        /// The exact `iss` of its tokens (https://...).
        #[arg(long)]
        issuer: String,
        /// The `aud` its tokens must carry (usually the client id).
        #[arg(long)]
        audience: String,
        /// The claim whose values map to roles; dotted paths reach into objects.
        #[arg(long, default_value = "groups")]
        claim: String,
        /// VALUE=ROLE or VALUE=ROLE@PROJECT, e.g. `ops=cluster-admin`,
        /// `web-devs=project-member@web`; repeat for more.
        #[arg(long = "map", value_parser = crate::state::auth::ClaimMapping::parse)]
        mappings: Vec<crate::state::auth::ClaimMapping>,
        /// A CA certificate (PEM file) to trust for the issuer's HTTPS.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the issuers this cluster trusts.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop trusting an issuer; its tokens are refused at once.
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; with --password-stdin, read its password from the first line of standard input.
    Create {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a user with their roles and tokens (never the last cluster administrator).
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Refuse a user's tokens and password from now on, keeping the user.
    Disable {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Let a disabled user in again.
    Enable {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum RoleCommand {
    /// Give USER a role: cluster-admin, or project-admin|project-member|project-viewer in --project.
    Grant {
        user: String,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        role: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take USER's role in --project, or with --cluster-admin the cluster-admin role.
    Revoke {
        user: String,
        #[arg(
            long,
            required_unless_present = "cluster_admin",
            conflicts_with = "cluster_admin"
        )]
        project: Option<String>,
        #[arg(long)]
        cluster_admin: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token (the secret is printed once).
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        role: Option<String>,
        /// Lifetime, e.g. 24h or 30d; none means until revoked.
        #[arg(long, value_parser = parse_duration_secs)]
        expires: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token by its id.
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    #[arg(long)]
    pub url: String,
    /// PEM file of the cluster CA.
    #[arg(long)]
    pub ca: PathBuf,
    /// User name (asked for when missing).
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Config file to write (default: $XDG_CONFIG_HOME/allod/config.json or ~/.config/allod/config.json).
    #[arg(long, env = "ALLOD_CONFIG")]
    pub config: Option<PathBuf>,
}

pub(super) async fn run_user(command: UserCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        UserCommand::Create {
            name,
            password_stdin,
            api,
        } => {
            let client = api.resolve()?;
            let password = if password_stdin {
                Some(read_line(None)?)
            } else {
                None
            };
            let user = client
                .call(
                    Method::POST,
                    "/v1/users",
                    body(&CreateUser { name, password }),
                )
                .await?;
            emit(api.output, &user, |u| {
                println!("Created user {}.", text(&u["name"]))
            });
        }
        UserCommand::Delete { name, api } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/users/{name}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("Deleted user {name} with their roles and tokens.");
            }
        }
        UserCommand::Disable { name, api } => set_disabled(&name, &api, true).await?,
        UserCommand::Enable { name, api } => set_disabled(&name, &api, false).await?,
        UserCommand::List { api } => {
            request(&api, Method::GET, "/v1/users", None, |u| {
                let rows: Vec<Vec<String>> = u
                    .as_array()
                    .map(|users| {
                        users
                            .iter()
                            .map(|u| {
                                let projects = u["projects"]
                                    .as_object()
                                    .map(|m| {
                                        m.iter()
                                            .map(|(p, r)| format!("{p}={}", text(r)))
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    })
                                    .unwrap_or_default();
                                vec![text(&u["name"]), text(&u["cluster_admin"]), projects]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "CLUSTER-ADMIN", "PROJECT ROLES"], &rows);
            })
            .await?;
        }
    }
    Ok(())
}

async fn set_disabled(name: &str, api: &ApiArgs, disabled: bool) -> anyhow::Result<()> {
    request(
        api,
        reqwest::Method::PATCH,
        &format!("/v1/users/{name}"),
        body(&crate::api_types::UpdateUser {
            disabled: Some(disabled),
        }),
        |u| {
            if disabled {
                println!(
                    "Disabled user {}: their tokens and password are refused.",
                    text(&u["name"])
                )
            } else {
                println!("Enabled user {}.", text(&u["name"]))
            }
        },
    )
    .await
    .map(|_| ())
}

pub(super) async fn run_role(command: RoleCommand) -> anyhow::Result<()> {
    let (user, project, role, api) = match command {
        RoleCommand::Grant {
            user,
            project,
            role,
            api,
        } => (user, project, role, api),
        RoleCommand::Revoke {
            user,
            project,
            cluster_admin: _,
            api,
        } => {
            let query = match &project {
                Some(project) => format!("project={project}"),
                None => "role=cluster-admin".to_string(),
            };
            request(
                &api,
                reqwest::Method::DELETE,
                &format!("/v1/users/{user}/roles?{query}"),
                None,
                |_| match &project {
                    Some(p) => println!("{user} has no role in project {p} now."),
                    None => println!("{user} is no cluster administrator now."),
                },
            )
            .await?;
            return Ok(());
        }
    };
    request(
        &api,
        reqwest::Method::POST,
        &format!("/v1/users/{user}/roles"),
        body(&GrantRole { role, project }),
        |r| match r.get("project") {
            Some(p) => println!(
                "Granted {} in project {} to {}.",
                text(&r["role"]),
                text(p),
                text(&r["user"])
            ),
            None => println!("Granted {} to {}.", text(&r["role"]), text(&r["user"])),
        },
    )
    .await?;
    Ok(())
}

pub(super) async fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        TokenCommand::Create {
            user,
            project,
            role,
            expires,
            api,
        } => {
            let client = api.resolve()?;
            let payload = CreateToken {
                project,
                role,
                expires_in_secs: expires,
            };
            let token = client
                .call(
                    Method::POST,
                    &format!("/v1/users/{user}/tokens"),
                    body(&payload),
                )
                .await?;
            emit(api.output, &token, |t| {
                println!(
                    "Token {} for {} (shown only now):",
                    text(&t["id"]),
                    text(&t["user"])
                );
                println!("{}", text(&t["token"]));
            });
        }
        TokenCommand::Revoke { id, api } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/tokens/{id}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("Revoked token {id}.");
            }
        }
    }
    Ok(())
}

pub(super) async fn run_oidc(command: OidcCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        OidcCommand::Add {
            name,
            issuer,
            audience,
            claim,
            mappings,
            ca,
            api,
        } => {
            let ca_pem = match ca {
                Some(path) => Some(std::fs::read_to_string(&path).with_context(|| {
                    format!("cannot read the CA certificate {}", path.display())
                })?),
                None => None,
            };
            let client = api.resolve()?;
            let spec = IssuerSpec {
                issuer,
                audience,
                claim: Some(claim),
                mappings,
                ca_pem,
            };
            let stored = client
                .call(
                    Method::PUT,
                    &format!("/v1/oidc/issuers/{name}"),
                    body(&spec),
                )
                .await?;
            emit(api.output, &stored, |i| {
                println!(
                    "Trusting {} as {} (audience {}, {} mapping(s) of claim {}).",
                    text(&i["issuer"]),
                    text(&i["name"]),
                    text(&i["audience"]),
                    i["mappings"].as_array().map_or(0, |m| m.len()),
                    text(&i["claim"])
                )
            });
        }
        OidcCommand::List { api } => {
            request(&api, Method::GET, "/v1/oidc/issuers", None, |list| {
                let rows: Vec<Vec<String>> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        let mappings: Vec<String> = i["mappings"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|m| match m["project"].as_str() {
                                Some(p) => {
                                    format!("{}={}@{p}", text(&m["value"]), text(&m["role"]))
                                }
                                None => format!("{}={}", text(&m["value"]), text(&m["role"])),
                            })
                            .collect();
                        vec![
                            text(&i["name"]),
                            text(&i["issuer"]),
                            text(&i["audience"]),
                            text(&i["claim"]),
                            mappings.join(" "),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "ISSUER", "AUDIENCE", "CLAIM", "MAPPINGS"], &rows);
            })
            .await?;
        }
        OidcCommand::Remove { name, api } => {
            request(
                &api,
                Method::DELETE,
                &format!("/v1/oidc/issuers/{name}"),
                None,
                |_| {},
            )
            .await?;
            if api.output == Output::Table {
                println!("No longer trusting issuer {name}.");
            }
        }
    }
    Ok(())
}

pub(super) async fn run_login(args: LoginArgs) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(&args.ca)
        .with_context(|| format!("cannot read the CA certificate {}", args.ca.display()))?;
    let user = match args.user {
        Some(user) => user,
        None => read_line(Some("User: "))?,
    };
    let password = if args.password_stdin {
        read_line(None)?
    } else {
        read_line(Some("Password: "))?
    };
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(crate::cluster::pki::ca_client_config(&ca_pem)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let response = http
        .post(format!("{url}/v1/login"))
        .json(&Login {
            user: user.clone(),
            password,
        })
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{} (HTTP {})",
            body["error"]["message"].as_str().unwrap_or("login refused"),
            status.as_u16()
        );
    }
    let path = args
        .config
        .or_else(default_config_path)
        .context("no config file location: set HOME or pass --config")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let ca = std::fs::canonicalize(&args.ca).unwrap_or(args.ca);
    let config = CliConfig {
        url: Some(url),
        token: body["token"].as_str().map(str::to_string),
        ca: Some(ca),
    };
    crate::cluster::pki::write_private(&path, &serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "Logged in as {user}; the session token (valid 24 h) is in {}.",
        path.display()
    );
    Ok(())
}
