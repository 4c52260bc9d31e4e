#!/usr/bin/env bash
# Download Meta's Llama 2 weights from the signed URL sent by email, resuming
# partial files and verifying every file against Meta's md5 checklists.
# Portable to bash 3.2 (macOS): no associative arrays, ${var,,} or mapfile.
# See docs/download.md, or run with --help.

set -u
set -f  # no globbing: the signed URL contains a literal '*'
export LC_ALL=C  # byte-wise tr/awk on binary data; untranslated wget messages

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"

usage() {
    cat <<EOF
Usage: ${0##*/} [--url URL] [--models LIST] [--target-dir DIR]

Downloads Llama 2 weights from the signed URL in Meta's email, resumes
interrupted transfers and verifies every file against Meta's checklists.
Anything not given as a flag or environment variable is asked for.

Options (each can also be set with the environment variable shown):
  --url URL         signed URL from the email; it contains a '*'
                    (LLAMA_DOWNLOAD_URL)
  --models LIST     comma-separated models out of
                    $ALL_MODELS; empty or "all" = all
                    (LLAMA_MODELS)
  --target-dir DIR  where to download; default: current directory
                    (LLAMA_TARGET_DIR)
  -h, --help        show this help

Other environment variables:
  LLAMA_DOWNLOADER  wget or curl; default: wget if installed, else curl
  LLAMA_TRIES       attempts per file before giving up (default 5)
  LLAMA_RETRY_WAIT  seconds before the first retry, doubled on each further
                    retry (default 5)

Rerunning with the same arguments resumes: files already downloaded are
checked again and kept, partial files (*.part) are continued.
Exit status: 0 all files downloaded and verified, 1 failure, 2 bad usage.
EOF
}

say()  { printf '%s\n' "$*" >&2; }
die()  { say "error: $*"; exit 1; }
usage_error() { say "error: $*"; say "Run '${0##*/} --help' for usage."; exit 2; }

# --- settings: flags override the environment --------------------------------
URL=${LLAMA_DOWNLOAD_URL-}
MODELS=${LLAMA_MODELS-}
MODELS_SET=${LLAMA_MODELS+yes}    # set (even to empty) means "don't ask"
TARGET_DIR=${LLAMA_TARGET_DIR:-.}
TRIES=${LLAMA_TRIES:-5}
RETRY_WAIT=${LLAMA_RETRY_WAIT:-5}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --url|--models|--target-dir)
            [ $# -ge 2 ] || usage_error "$1 needs a value"
            opt=$1; val=$2; shift 2 ;;
        --url=*|--models=*|--target-dir=*)
            opt=${1%%=*}; val=${1#*=}; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    case "$opt" in
        --url) URL=$val ;;
        --models) MODELS=$val; MODELS_SET=yes ;;
        --target-dir) TARGET_DIR=$val ;;
    esac
done

case "$TRIES" in ''|*[!0-9]*|0) usage_error "LLAMA_TRIES must be a positive integer" ;; esac
case "$RETRY_WAIT" in ''|*[!0-9]*) usage_error "LLAMA_RETRY_WAIT must be a whole number of seconds" ;; esac

# --- tools -------------------------------------------------------------------
DOWNLOADER=${LLAMA_DOWNLOADER-}
if [ -z "$DOWNLOADER" ]; then
    if command -v wget >/dev/null 2>&1; then DOWNLOADER=wget
    elif command -v curl >/dev/null 2>&1; then DOWNLOADER=curl
    else die "neither wget nor curl is installed; install one of them and rerun"
    fi
fi
case "$DOWNLOADER" in
    wget|curl) command -v "$DOWNLOADER" >/dev/null 2>&1 ||
        die "LLAMA_DOWNLOADER=$DOWNLOADER but $DOWNLOADER is not installed" ;;
    *) usage_error "LLAMA_DOWNLOADER must be wget or curl, not '$DOWNLOADER'" ;;
esac

if command -v md5sum >/dev/null 2>&1; then MD5="md5sum"
elif command -v md5 >/dev/null 2>&1; then MD5="md5 -r"    # macOS
else die "neither md5sum nor md5 is installed; cannot verify downloads"
fi

# --- inputs --------------------------------------------------------------------
if [ -z "$URL" ]; then
    read -r -p "Enter the URL from email: " URL
fi
URL=$(printf '%s' "$URL" | tr -d ' \t\r\n"'"'")   # pasted blanks and quotes
[ -n "$URL" ] || usage_error "no URL given (prompt, --url or LLAMA_DOWNLOAD_URL)"
case "$URL" in
    http://*\**|https://*\**) ;;
    *) usage_error "the URL must be an https:// address containing a '*'; copy the whole URL from Meta's email (not a link you clicked)" ;;
esac

if [ -z "$MODELS_SET" ]; then
    read -r -p "Enter the models to download, comma-separated ($ALL_MODELS), or press Enter for all: " MODELS
fi
# Normalise: lower case, no blanks; empty or "all" selects every model.
MODELS=$(printf '%s' "$MODELS" | tr -d ' \t\r\n' | tr '[:upper:]' '[:lower:]')
case "$MODELS" in ''|all) MODELS=$(printf '%s' "$ALL_MODELS" | tr '[:upper:]' '[:lower:]') ;; esac

# Validate every name before downloading anything; drop duplicates.
SELECTED=""
UNKNOWN=""
for m in $(printf '%s' "$MODELS" | tr ',' ' '); do
    case ",$(printf '%s' "$ALL_MODELS" | tr '[:upper:]' '[:lower:]')," in
        *",$m,"*) case " $SELECTED " in *" $m "*) ;; *) SELECTED="$SELECTED $m" ;; esac ;;
        *) UNKNOWN="$UNKNOWN $m" ;;
    esac
done
[ -z "$UNKNOWN" ] || usage_error "unknown model(s):$UNKNOWN. Valid names: $ALL_MODELS"
[ -n "$SELECTED" ] || usage_error "no model selected. Valid names: $ALL_MODELS"

mkdir -p "$TARGET_DIR" || die "cannot create target folder $TARGET_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
HEADERS="$WORK/headers"

# --- helpers -------------------------------------------------------------------
# Remote URL of a file: the signed URL with its '*' replaced by the file's path.
url_for() { printf '%s%s%s' "${URL%%\**}" "$1" "${URL#*\*}"; }

size_of() { echo $(( $(wc -c < "$1") )); }   # $(( )) drops macOS wc's padding

# One downloader run (which itself retries a few times), resuming PART.
# Response headers go to $HEADERS; progress is shown on stderr.
transfer() {
    rm -f "$HEADERS"
    if [ "$DOWNLOADER" = wget ]; then
        # -o keeps wget's messages (and the signed URL) in a log;
        # --show-progress still draws the progress bar on the terminal.
        wget --continue --server-response --tries=3 \
            --waitretry="$RETRY_WAIT" --timeout=60 \
            --show-progress --progress=bar:force:noscroll \
            -o "$HEADERS" -O "$2" "$1"
    else
        curl --location --fail --continue-at - --retry 3 \
            --retry-delay "$RETRY_WAIT" --connect-timeout 30 \
            --speed-limit 1 --speed-time 60 \
            --dump-header "$HEADERS" --output "$2" "$1"
    fi
}

# Prints "STATUS TOTAL" for the last HTTP response in $HEADERS: its status code
# and the full size of the file (Content-Range total if there is a
# Content-Range, else Content-Length), "-" where unknown. wget indents the headers; both may end lines with CR.
last_response() {
    [ -f "$HEADERS" ] || { echo "- -"; return; }
    awk '
        { sub(/\r$/, ""); sub(/^ +/, "") }
        /^HTTP\/[0-9.]+ [0-9][0-9][0-9]/ { status = $2; length_ = ""; range = "" }
        tolower($1) == "content-length:" { length_ = $2 }
        tolower($1) == "content-range:"  { range = $NF; sub(/.*\//, "", range) }
        END {
            total = (range != "") ? range : length_
            if (total == "*") total = ""
            if (status == "") status = "-"
            if (total == "") total = "-"
            print status, total
        }' "$HEADERS"
}

# Why the last transfer got no HTTP response at all, in the downloader's words
# (wget's are in its log; curl's on the terminal, and in its exit code).
no_response_reason() {
    local rc=$1 line=""
    if [ "$DOWNLOADER" = wget ]; then
        [ -f "$HEADERS" ] && line=$(grep -E "failed|unable to|[Ee]rror|refused|timed out" "$HEADERS" | tail -n 1)
    else
        case "$rc" in
            5) line="could not resolve the proxy" ;;
            6) line="could not resolve the host name" ;;
            7) line="could not connect to the server" ;;
            28) line="the connection timed out" ;;
            35|60) line="the TLS (https) connection failed" ;;
        esac
    fi
    printf '%s' "${line:-the downloader exited with status $rc}"
}

# True if FILE starts with HTML markup (an error or login page, not our data).
is_html() {
    local start
    start=$(head -c 256 "$1" | tr -d '\000 \t\r\n' | tr '[:upper:]' '[:lower:]')
    case "$start" in '<!doctypehtml'*|'<html'*) return 0 ;; esac
    return 1
}

DOWNLOADED=0
PRESENT=0
COUNT=0
TOTAL_FILES=0

# Download remote path REL to TARGET_DIR/REL via REL.part; the final name
# appears only once the transfer is complete, size-checked and not HTML.
fetch() {
    local rel=$1 dest="$TARGET_DIR/$1" part="$TARGET_DIR/$1.part"
    local url attempt=1 rc status total size
    COUNT=$((COUNT + 1))
    # e.g. an error page saved by an older script: set it aside, fetch again
    if [ -f "$dest" ] && is_html "$dest"; then
        say "$rel: the existing file is an HTML page; moving it to $rel.bad"
        mv -f "$dest" "$dest.bad"
    fi
    if [ -f "$dest" ]; then
        say "[$COUNT/$TOTAL_FILES] $rel: already downloaded"
        PRESENT=$((PRESENT + 1))
        return
    fi
    say "[$COUNT/$TOTAL_FILES] $rel"
    url=$(url_for "$rel")
    while :; do
        transfer "$url" "$part"
        rc=$?
        read -r status total <<< "$(last_response)"
        case "$status" in
            408|416|429) ;;  # transient, or handled below
            4??)
                [ -s "$part" ] || rm -f "$part"   # wget -O leaves an empty file
                [ "$status" = 403 ] && die "HTTP 403 Forbidden for $rel: the download link has expired (it is valid for 24 hours) or its downloads are used up. Request a new link from Meta and run this script again; finished files are kept."
                die "HTTP $status for $rel: the server refused it; check that the whole URL from the email was copied" ;;
        esac
        if [ -f "$part" ]; then size=$(size_of "$part"); else size=0; fi
        # 416: nothing left to send; fine only if the part is already whole.
        if [ "$status" = 416 ]; then
            [ "$size" = "$total" ] && break
            rm -f "$part"
        elif [ "$rc" -eq 0 ]; then
            { [ "$total" = - ] || [ "$size" = "$total" ]; } && break
            say "$rel: got $size bytes but the server announced $total"
            [ "$size" -gt "$total" ] && rm -f "$part"   # can't be resumed
        elif [ "$DOWNLOADER" = curl ] && [ "$rc" -eq 33 ]; then
            rm -f "$part"   # server ignored the range request: start over
        fi
        if [ "$attempt" -ge "$TRIES" ]; then
            [ "$status" = - ] && die "could not download $rel after $TRIES attempts: no response from the server ($(no_response_reason "$rc")). Check the network connection and proxy settings (https_proxy), then run the script again to resume."
            die "could not download $rel after $TRIES attempts (last HTTP status: $status). Run the script again to resume."
        fi
        if [ -f "$part" ]; then size=$(size_of "$part"); else size=0; fi
        say "$rel: transfer incomplete; attempt $((attempt + 1))/$TRIES from byte $size"
        sleep $((RETRY_WAIT << (attempt - 1)))
        attempt=$((attempt + 1))
    done
    [ -f "$part" ] || : > "$part"   # curl creates no file for an empty body
    if is_html "$part"; then
        mv -f "$part" "$dest.bad"
        die "the server sent an HTML page instead of $rel (kept as $rel.bad). The link is probably invalid or expired: copy the URL from the email again or request a new one."
    fi
    mv -f "$part" "$dest" || die "cannot rename $part"
    DOWNLOADED=$((DOWNLOADED + 1))
}

VERIFIED=""

# verify DIR CHECKLIST FILE...: compare each FILE's md5 with its line in
# DIR/CHECKLIST ("<md5>  <name>"). A mismatching file is renamed to .bad so
# that a rerun downloads it again.
verify() {
    local dir=$1 list=$2 prefix="" f rel want got failed=""
    shift 2
    [ "$dir" = . ] || prefix="$dir/"
    for f in "$@"; do
        rel="$prefix$f"
        want=$(awk -v name="$f" '
            { sub(/\r$/, ""); n = $2; sub(/^\*/, "", n) }
            n == name { print tolower($1); exit }' "$TARGET_DIR/$prefix$list")
        [ -n "$want" ] || die "$rel is not listed in $prefix$list; cannot verify it"
        say "verifying $rel"
        got=$($MD5 < "$TARGET_DIR/$rel") || die "cannot read $TARGET_DIR/$rel"
        got=${got%% *}
        if [ "$got" = "$want" ]; then
            VERIFIED="$VERIFIED
  $rel"
        else
            mv -f "$TARGET_DIR/$rel" "$TARGET_DIR/$rel.bad"
            say "checksum mismatch: $rel (expected $want, got $got); moved to $rel.bad"
            failed="$failed $rel"
        fi
    done
    [ -z "$failed" ] || die "checksum verification failed for:$failed. Run the script again to download these files again."
}

shards_of() {
    case "$1" in 7b*) echo 1 ;; 13b*) echo 2 ;; 70b*) echo 8 ;; esac
}

# --- download ------------------------------------------------------------------
TOTAL_FILES=4
for m in $SELECTED; do TOTAL_FILES=$((TOTAL_FILES + $(shards_of "$m") + 2)); done

say "Downloading$SELECTED into $TARGET_DIR with $DOWNLOADER"
fetch LICENSE
fetch USE_POLICY.md
fetch tokenizer_checklist.chk
fetch tokenizer.model
verify . tokenizer_checklist.chk tokenizer.model

for m in $SELECTED; do
    dir="llama-2-$m"
    mkdir -p "$TARGET_DIR/$dir" || die "cannot create $TARGET_DIR/$dir"
    files=""
    i=0
    while [ "$i" -lt "$(shards_of "$m")" ]; do
        files="$files $(printf 'consolidated.%02d.pth' "$i")"
        i=$((i + 1))
    done
    files="$files params.json"
    fetch "$dir/checklist.chk"
    for f in $files; do fetch "$dir/$f"; done
    verify "$dir" checklist.chk $files
done

say ""
say "Done: $DOWNLOADED file(s) downloaded, $PRESENT already present, in $TARGET_DIR."
say "Verified against Meta's checklists:$VERIFIED"
