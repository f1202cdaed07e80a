# bash completion for cprctl(1): verbs, each verb's options, VM names (asked
# of cprd with `cprctl list --name`, with the --socket on the command line).
# Installed as share/bash-completion/completions/cprctl; stands alone (does
# not need the bash-completion package's helpers).

_cprctl_vms()
{
	local sock=() i
	for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
		if [[ ${COMP_WORDS[i]} == --socket ]]; then
			sock=(--socket "${COMP_WORDS[i + 1]}")
		fi
	done
	cprctl "${sock[@]}" --timeout 2 list --name 2>/dev/null
}

_cprctl()
{
	local cur=${COMP_WORDS[COMP_CWORD]} prev=
	local verbs="create list status dumpspec fds destroy pause resume update checkpoint restore history purge daemon metrics events methods help"
	local common="--socket --json --timeout --help --version"
	local verb= i
	((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
	COMPREPLY=()

	for ((i = 1; i < COMP_CWORD; i++)); do
		case ${COMP_WORDS[i]} in
		--socket | --timeout) ((i++)) ;;
		-*) ;;
		*)
			verb=${COMP_WORDS[i]}
			break
			;;
		esac
	done

	case $prev in
	--socket | --kernel | --initrd | --vmm | --binary | --disk | --spec)
		COMPREPLY=($(compgen -f -- "$cur"))
		return
		;;
	--strategy)
		COMPREPLY=($(compgen -W "handover cpr-transfer cpr-exec" -- "$cur"))
		return
		;;
	--state)
		COMPREPLY=($(compgen -W "starting running paused stopping crashed" -- "$cur"))
		return
		;;
	--timeout | --memory | --vcpus | --append | --tap | --machine | --cpu | --parallel)
		return
		;;
	esac

	local opts=
	case $verb in
	"")
		COMPREPLY=($(compgen -W "$verbs $common" -- "$cur"))
		return
		;;
	create) opts="--memory --kernel --initrd --append --vcpus --vmm --tap --disk --machine --cpu --cpr-exec --spec" ;;
	list) opts="--state --outdated --name" ;;
	update) opts="--all --outdated --check --vmm --strategy --parallel" ;;
	daemon) opts="--reset --binary" ;;
	history) opts="--all" ;;
	checkpoint) opts="--all --dir --method --channels --timeout --parallel" ;;
	restore) opts="--all --vmm --dir --memory --timeout --parallel" ;;
	esac

	if [[ $cur == -* ]]; then
		COMPREPLY=($(compgen -W "$opts $common" -- "$cur"))
		return
	fi
	case $verb in
	status | dumpspec | fds | destroy | pause | resume | update | checkpoint | restore | history | purge)
		COMPREPLY=($(compgen -W "$(_cprctl_vms)" -- "$cur"))
		;;
	daemon)
		COMPREPLY=($(compgen -W "status stats reexec" -- "$cur"))
		;;
	help)
		COMPREPLY=($(compgen -W "$verbs" -- "$cur"))
		;;
	esac
}

complete -F _cprctl cprctl
