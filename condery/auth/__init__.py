"""Who may pull what: identities, tokens, rules (configuration: `auth:`, docs/auth.md).

    rules.py       pure: identities, principals, name globs, the first-match pull rules,
                   endpoint rights, which channels an identity may read
    identities.py  logins: the htpasswd file (bcrypt only) and the groups file, both reread
                   when they change; robot accounts (static tokens kept as sha256)
    tokens.py      the tokens condery signs (JWT, HS256/RS256/ES256 with a `kid`, the key
                   file reread when it changes), scopes and the access claim
    oidc.py        tokens of an external OpenID Connect issuer, checked against its JWKS
    ratelimit.py   failed logins per client address and per user name
    service.py     the Authenticator: credentials to an identity, token requests to tokens
    http.py        aiohttp: the middleware that guards every route, the `/token` endpoint

Without `auth:` none of this runs and every pull is anonymous, as before.
"""
